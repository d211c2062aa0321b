//! Invalidation and registration: memory the program already has (`register` of a malloc'd
//! buffer), and a stress test where one thread maps, remaps, discards and unmaps pieces of shared
//! memory while CPU threads and device kernels read and write it, checked against a reference
//! model byte for byte.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hetmm::core::device::DeviceError;
use hetmm::sim::{BlockCtx, Grid, SimConfig, SimDevice};
use hetmm::{Hetmm, Place, Proc};

const PS: usize = 4096;

fn setup(mem: u64) -> (Hetmm, hetmm::Device<SimDevice>) {
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let dev = hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: mem, ..SimConfig::default() }).unwrap()).unwrap();
    (hm, dev)
}

/// A thread that registers and unmaps other memory in a loop does not make migrations of a
/// buffer fail or retry: only a change overlapping a revoke's range races it. (Any unmap of
/// registered memory read during a revoke counted: 1-4 of 1000 migrations of 16 MiB failed after
/// their eight retries, and many more were retried.)
#[test]
fn unmapping_other_registered_memory_does_not_race_migrations() {
    let (hm, dev) = setup(16 << 20);
    let hm = Arc::new(hm);
    let mut buf = hm.alloc::<u8>(4 << 20).unwrap();
    let (start, len) = (buf.ptr(), buf.byte_len());
    buf.as_mut_slice().fill(7);
    let stop = Arc::new(AtomicBool::new(false));
    let churns = Arc::new(AtomicU64::new(0));
    let churn = {
        let (hm, stop, churns) = (Arc::clone(&hm), Arc::clone(&stop), Arc::clone(&churns));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let len = 16 * PS;
                let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                // SAFETY: an anonymous mapping where the kernel picks replaces no existing mapping.
                let p =
                    unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
                assert_ne!(p, libc::MAP_FAILED);
                // SAFETY: `p` starts the 16-page read-write mapping this thread just made and alone
                // uses.
                unsafe { p.cast::<u8>().write(1) };
                hm.register(p.cast(), len).unwrap();
                // SAFETY: unmaps only the mapping this thread made above; nothing holds a reference
                // into it.
                assert_eq!(unsafe { libc::munmap(p, len) }, 0);
                churns.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut i = 0u64;
    // At least 200 migrations, and until the other thread has unmapped 200 times; bounded, and
    // not waiting on a thread that has stopped (its panic is reported by the join below rather
    // than left as a test that never ends).
    let t = Instant::now();
    while (i < 200 || churns.load(Ordering::Relaxed) < 200) && !churn.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(120), "{i} migrations, {churns:?} unmaps in 120 s");
        let to = if i.is_multiple_of(2) {
            // Mapped by the CPU again, so that the migration to the device revokes.
            buf.as_mut_slice().iter_mut().step_by(PS).for_each(|b| *b = 7);
            dev.proc()
        } else {
            Place::CPU
        };
        hm.migrate(start, len, to).unwrap_or_else(|e| panic!("migration {i}: {e}"));
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    assert_eq!(hm.stats().revokes_raced, 0, "no revoke raced a change of its range");
    assert!(buf.as_slice().iter().all(|&b| b == 7));
}

/// `register` on a 64 MiB buffer from the C heap (`calloc`) holding a pattern: a device kernel
/// reads the pattern and writes a new one; the CPU reads the new one through the original pointer.
#[test]
fn register_malloc_64mib() {
    let (hm, dev) = setup(256 << 20);
    let len = 64 << 20;
    let n = len / 8;
    // SAFETY: calloc has no preconditions; the result is checked for null below.
    let p = unsafe { libc::calloc(n, 8) }.cast::<u64>();
    assert!(!p.is_null());
    // SAFETY: `p` is this test's zero-filled heap block of `n` u64s (aligned, freed only at the
    // end). The device writes it only while `v` is idle.
    let v = unsafe { std::slice::from_raw_parts_mut(p, n) };
    for (i, x) in v.iter_mut().enumerate() {
        *x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    hm.register(p.cast(), len).unwrap();
    let base = p as u64;
    let per = 4096usize; // words per kernel block
    let k = move |ctx: &BlockCtx| {
        let s = ctx.block_idx() as usize * per;
        let cnt = per.min(n - s);
        let mut buf = vec![0u64; cnt];
        ctx.read_slice(base + s as u64 * 8, &mut buf)?;
        for (j, x) in buf.iter_mut().enumerate() {
            let i = (s + j) as u64;
            if *x != i.wrapping_mul(0x9E37_79B9_7F4A_7C15) {
                return Err(DeviceError::Other(format!("word {i}: {x:#x}")));
            }
            *x = !i;
        }
        ctx.write_slice(base + s as u64 * 8, &buf)
    };
    let grid = Grid::new(n.div_ceil(per) as u32, 32);
    common::launch_raw(dev.driver(), grid, k).unwrap().wait(Duration::from_secs(120)).unwrap();
    assert!(hm.stats().bytes_to_device >= len as u64, "the pattern travelled to the device");
    for (i, x) in v.iter().enumerate() {
        assert_eq!(*x, !(i as u64), "word {i}");
    }
    hm.unregister(p.cast(), len).unwrap();
    // Ordinary private memory again: the bytes stay, and free() works.
    assert_eq!(v[12345], !12345u64);
    // SAFETY: `p` came from malloc above and is ordinary private memory again (unregistered);
    // `v` is not used after this.
    unsafe { libc::free(p.cast()) };
}

/// A kernel of one thread that loads the word at `va` into the returned cell.
fn load_word(va: u64) -> (Arc<AtomicU64>, impl Fn(&BlockCtx) -> Result<(), DeviceError> + Send + Sync + 'static) {
    let out = Arc::new(AtomicU64::new(0));
    let o = Arc::clone(&out);
    (out, move |ctx: &BlockCtx| {
        o.store(ctx.load::<u64>(va)?, Ordering::SeqCst);
        Ok(())
    })
}

/// A `register` of memory that is already shared (an allocated buffer) is refused and leaves
/// the buffer alone: its error path released the whole range, taking the buffer's region from
/// the core.
#[test]
fn register_of_shared_memory_is_refused_and_changes_nothing() {
    let (hm, dev) = setup(64 << 20);
    let mut a = hm.alloc::<u64>(2 * PS / 8).unwrap();
    a.as_mut_slice().fill(7);
    assert!(hm.register(a.ptr() as *const u8, 2 * PS).is_err(), "already shared");
    hm.migrate(a.ptr(), 2 * PS as u64, dev.proc()).expect("still shared memory");
    assert_eq!(a.as_slice()[5], 7);
}

/// The program unmaps registered `MAP_SHARED` shmem memory and maps private memory at the same
/// address: hetmm follows the unmap, so a device no longer reads the old pages there, and the
/// new memory can be registered (the mirror was never told of the unmap: the device read the
/// unmapped memfd's bytes, and the new registration overlapped).
#[test]
fn munmap_of_registered_shared_memory_is_followed() {
    let (hm, dev) = setup(64 << 20);
    let len = 2 * PS;
    // SAFETY: the name is a NUL-terminated C string literal.
    let fd = unsafe { libc::memfd_create(c"hetmm-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is the memfd this test just created and owns.
    assert_eq!(unsafe { libc::ftruncate(fd, len as i64) }, 0);
    let old = vec![0xAAu8; len];
    // SAFETY: `old` is a live buffer of `len` bytes; `fd` is our own memfd.
    assert_eq!(unsafe { libc::pwrite(fd, old.as_ptr().cast(), len, 0) }, len as isize);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: maps our own memfd where the kernel chooses, replacing no existing mapping.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_SHARED, fd, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    hm.register(p.cast(), len).unwrap();
    let (seen, k) = load_word(p as u64);
    common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 0xAAAA_AAAA_AAAA_AAAA);
    // MAP_FIXED unmaps the old memory (userfaultfd reports the unmap as munmap's) and maps the
    // new in one call. An munmap followed by a mapping at the same address left the hole free in
    // between: a thread starting meanwhile (hetmm's or the device's) put its signal stack there,
    // and the test's mapping failed with EEXIST (1 of about 80 runs).
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
    // SAFETY: MAP_FIXED replaces only `[p, p + len)`, the memfd mapping this test made; no Rust
    // reference into it exists (device kernels read it through hetmm, not through Rust).
    let q = unsafe { libc::mmap(p, len, rw, flags, -1, 0) };
    assert_eq!(q, p);
    // SAFETY: `fd` is our memfd, closed once and not used after.
    unsafe { libc::close(fd) };
    // SAFETY: `q` is the `len`-byte private read-write mapping just made, which only this thread
    // uses.
    unsafe { std::ptr::write_bytes(q.cast::<u8>(), 0x55, len) };
    hm.space().settle().unwrap();
    let (stale, k) = load_word(p as u64);
    let r = common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30));
    assert!(r.is_err(), "the device read {:#x} at unshared memory", stale.load(Ordering::SeqCst));
    hm.register(q.cast(), len).expect("the old registration is gone");
    let (seen, k) = load_word(q as u64);
    common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 0x5555_5555_5555_5555);
    hm.unregister(q.cast(), len).unwrap();
    // SAFETY: unmaps only the private mapping this test made at `q`; nothing refers to it after.
    unsafe { libc::munmap(q, len) };
}

/// `unregister` of registered private memory right after a device wrote it: the memory is
/// ordinary private memory again holding the device's bytes (the host's record of the
/// registration was gone by the time it was asked to give the memory back, so the memory stayed
/// registered and the first CPU read got SIGBUS).
#[test]
fn unregister_after_a_device_write_keeps_the_bytes() {
    let (hm, dev) = setup(64 << 20);
    let len = 2 * (2 << 20);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a new anonymous mapping where the kernel chooses replaces no existing mapping.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `p` is the `len`-byte read-write mapping just made, which only this thread uses.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x11, len) };
    hm.register(p.cast(), len).unwrap();
    let va = p as u64;
    let k = move |ctx: &BlockCtx| ctx.store::<u64>(va, 0x2222_2222_2222_2222);
    common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
    hm.unregister(p.cast(), len).unwrap();
    // SAFETY: `p` starts our page-aligned `len`-byte mapping, mapped and private again after
    // unregister.
    assert_eq!(unsafe { *(p as *const u64) }, 0x2222_2222_2222_2222);
    // SAFETY: the last byte of that mapping, still mapped.
    assert_eq!(unsafe { *(p as *const u8).add(len - 1) }, 0x11);
    assert!(hm.space().check_span(va, len as u64).is_err(), "no longer shared");
    // SAFETY: unmaps only the mapping this test made at `p`; nothing refers to it after.
    unsafe { libc::munmap(p, len) };
}

/// One slot of the stress test's area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A PROT_NONE placeholder (unmanaged).
    Hole,
    /// Shared memory holding generation `gen`.
    Live(u64),
    /// Someone else's mapping took the hole; never used again.
    Gone,
}

const SLOT_PAGES: usize = 16;
const SLOT: usize = SLOT_PAGES * PS;
const WORDS: usize = SLOT / 8;

fn word(gen: u64, slot_addr: u64, w: usize) -> u64 {
    // The value does not depend on the slot's address: remapped data keeps its bytes.
    let _ = slot_addr;
    (gen << 20) ^ w as u64 ^ 0x5A5A_0000_0000_0000
}

struct Area {
    base: usize,
    slots: Vec<Mutex<Slot>>,
}

impl Area {
    fn addr(&self, i: usize) -> usize {
        self.base + i * SLOT
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Puts a PROT_NONE placeholder back at `addr` (after an unmap or a remap away). Between the
/// unmap and this call the hole belongs to the kernel's allocator: another thread's mapping (a
/// new thread's signal stack, for one) may land in it, and must not be replaced by ours. Waits
/// for such a mapping to go away; returns false if it stays (the slot is then never used again).
fn reserve(addr: usize) -> bool {
    let t = Instant::now();
    loop {
        // SAFETY: MAP_FIXED_NOREPLACE fails rather than replace anything at `addr`: no existing
        // mapping, ours or another thread's, is touched.
        let p = unsafe {
            libc::mmap(
                addr as *mut _,
                SLOT,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as usize == addr {
            return true;
        }
        let err = std::io::Error::last_os_error();
        if p != libc::MAP_FAILED {
            // A kernel without MAP_FIXED_NOREPLACE treats it as a hint: give that mapping back.
            // SAFETY: `p` is the mapping the call above just made elsewhere (the hint ignored),
            // which nothing else knows of.
            unsafe { libc::munmap(p, SLOT) };
        }
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST), "placeholder at {addr:#x}: {err}");
        if t.elapsed() > Duration::from_secs(2) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn check_cpu(addr: usize, gen: u64) {
    // SAFETY: callers pass a live slot whose lock they hold (or after every worker is joined):
    // SLOT mapped, page-aligned bytes that nothing unmaps, moves or writes meanwhile.
    let v = unsafe { std::slice::from_raw_parts(addr as *const u64, WORDS) };
    for (w, x) in v.iter().enumerate() {
        assert_eq!(*x, word(gen, addr as u64, w), "slot {addr:#x} word {w} gen {gen}");
    }
}

fn fill_cpu(addr: usize, gen: u64) {
    // SAFETY: callers pass a slot they mapped read-write and hold the lock of: SLOT mapped,
    // page-aligned bytes that no one else reads, writes or unmaps meanwhile.
    let v = unsafe { std::slice::from_raw_parts_mut(addr as *mut u64, WORDS) };
    for (w, x) in v.iter_mut().enumerate() {
        *x = word(gen, addr as u64, w);
    }
}

// Two causes of wrong bytes this test found, both fixed: kernels launched right after an
// munmap/mremap returned ran before hetmm had applied the event (userfaultfd lets the call return
// once the event is read), so they read through the device's mapping of whatever used to be at
// their addresses (`Device::launch` now settles pending events first); and the test's own
// placeholders replaced other threads' mappings that landed in a hole (see `reserve`).
#[test]
fn stress_map_remap_discard_unmap_under_cpu_and_device_traffic() {
    let secs: u64 = std::env::var("HETMM_STRESS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    stress("hetmm", secs);
}

/// The same with the `uvm` policy (no read duplication, no prefetch thread), for half the time.
#[test]
fn stress_with_uvm_policy() {
    let secs: u64 = std::env::var("HETMM_STRESS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    stress("uvm", secs.div_ceil(2));
}

fn stress(policy: &str, secs: u64) {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Hetmm::with_policy(policy).expect("userfaultfd and memfd available");
    let dev =
        hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 64 << 20, ..SimConfig::default() }).unwrap()).unwrap();
    let hm = Arc::new(hm);
    let dev = Arc::new(dev);
    let nslots = 64;
    // SAFETY: a new PROT_NONE reservation where the kernel chooses replaces no existing mapping.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), nslots * SLOT, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(base, libc::MAP_FAILED);
    let area = Arc::new(Area { base: base as usize, slots: (0..nslots).map(|_| Mutex::new(Slot::Hole)).collect() });
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 8]> = Arc::new(Default::default());
    // 0 map, 1 unmap, 2 remap, 3 discard, 4 cpu check+write, 5 kernel check+write, 6 migrate, 7 kernel errors
    let mut threads = Vec::new();

    // The mutator: map, remap, discard, unmap.
    {
        let (hm, area, stop, counts) = (hm.clone(), area.clone(), stop.clone(), counts.clone());
        threads.push(std::thread::spawn(move || {
            let mut seed = 0x1234_5678_9ABC_DEF1u64;
            let mut gen = 1u64 << 24;
            while !stop.load(Ordering::Relaxed) {
                let i = (xorshift(&mut seed) % nslots as u64) as usize;
                let Ok(mut s) = area.slots[i].try_lock() else { continue };
                let a = area.addr(i);
                match *s {
                    Slot::Hole => {
                        // Map fresh private memory over the placeholder, fill it, share it.
                        // SAFETY: MAP_FIXED replaces only slot `i`'s PROT_NONE placeholder, ours
                        // (its held lock says Hole); nothing refers to it.
                        let p = unsafe {
                            libc::mmap(
                                a as *mut _,
                                SLOT,
                                libc::PROT_READ | libc::PROT_WRITE,
                                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                                -1,
                                0,
                            )
                        };
                        assert_eq!(p as usize, a);
                        gen += 1;
                        fill_cpu(a, gen);
                        hm.register(a as *const u8, SLOT).unwrap();
                        *s = Slot::Live(gen);
                        counts[0].fetch_add(1, Ordering::Relaxed);
                    }
                    Slot::Gone => {}
                    Slot::Live(g) => match xorshift(&mut seed) % 3 {
                        0 => {
                            // SAFETY: unmaps live slot `i`, ours; its held lock keeps CPU readers
                            // and launchers off, and no Rust reference into it outlives the lock.
                            assert_eq!(unsafe { libc::munmap(a as *mut _, SLOT) }, 0);
                            *s = if reserve(a) { Slot::Hole } else { Slot::Gone };
                            counts[1].fetch_add(1, Ordering::Relaxed);
                        }
                        1 => {
                            // Move it to a hole.
                            let j = (xorshift(&mut seed) % nslots as u64) as usize;
                            if j == i {
                                continue;
                            }
                            let Ok(mut t) = area.slots[j].try_lock() else { continue };
                            if *t != Slot::Hole {
                                continue;
                            }
                            let b = area.addr(j);
                            // SAFETY: moves live slot `i` over hole `j`'s placeholder, both ours
                            // and locked; no reference into either exists while the locks are held.
                            let r = unsafe {
                                libc::mremap(a as *mut _, SLOT, SLOT, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, b)
                            };
                            assert_eq!(r as usize, b, "{}", std::io::Error::last_os_error());
                            *s = if reserve(a) { Slot::Hole } else { Slot::Gone };
                            *t = Slot::Live(g);
                            counts[2].fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            // MADV_DONTNEED keeps the data of shared memory.
                            // SAFETY: live slot `i` is ours and locked; DONTNEED on its shared
                            // (registered) memory only drops page-table entries and keeps the data.
                            assert_eq!(unsafe { libc::madvise(a as *mut _, SLOT, libc::MADV_DONTNEED) }, 0);
                            counts[3].fetch_add(1, Ordering::Relaxed);
                        }
                    },
                }
            }
        }));
    }

    // CPU threads: check and rewrite live slots.
    for t in 0..2u64 {
        let (area, stop, counts) = (area.clone(), stop.clone(), counts.clone());
        threads.push(std::thread::spawn(move || {
            let mut seed = 0xDEAD_BEEF_0000_0001u64 + t;
            let mut gen = (t + 2) << 40;
            while !stop.load(Ordering::Relaxed) {
                let i = (xorshift(&mut seed) % nslots as u64) as usize;
                let Ok(mut s) = area.slots[i].try_lock() else { continue };
                if let Slot::Live(g) = *s {
                    let a = area.addr(i);
                    check_cpu(a, g);
                    gen += 1;
                    fill_cpu(a, gen);
                    *s = Slot::Live(gen);
                    counts[4].fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Device traffic: kernels that check and rewrite live slots, and explicit migrations.
    for t in 0..2u64 {
        let (hm, dev, area, stop, counts) = (hm.clone(), dev.clone(), area.clone(), stop.clone(), counts.clone());
        threads.push(std::thread::spawn(move || {
            let mut seed = 0xC0FF_EE00_0000_0001u64 + t;
            let mut gen = (t + 8) << 40;
            while !stop.load(Ordering::Relaxed) {
                let i = (xorshift(&mut seed) % nslots as u64) as usize;
                let Ok(mut s) = area.slots[i].try_lock() else { continue };
                let Slot::Live(g) = *s else { continue };
                let a = area.addr(i) as u64;
                if xorshift(&mut seed).is_multiple_of(4) {
                    hm.migrate(a, SLOT as u64, dev.proc()).unwrap();
                    counts[6].fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                gen += 1;
                let new = gen;
                let bad = Arc::new(Mutex::new(None::<String>));
                let b2 = bad.clone();
                let k = move |ctx: &BlockCtx| {
                    let p = ctx.block_idx() as usize;
                    let va = a + (p * PS) as u64;
                    let mut buf = vec![0u64; PS / 8];
                    ctx.read_slice(va, &mut buf)?;
                    for (j, x) in buf.iter_mut().enumerate() {
                        let w = p * PS / 8 + j;
                        if *x != word(g, a, w) {
                            b2.lock().unwrap().get_or_insert(format!("slot {a:#x} word {w}: {x:#x} gen {g}"));
                        }
                        *x = word(new, a, w);
                    }
                    ctx.write_slice(va, &buf)
                };
                // SAFETY: the slot is this thread's own, reached only through raw copies.
                let uses = [unsafe { hetmm::Use::raw(a, SLOT as u64, hetmm::Access::Write) }];
                let r = dev
                    .launch(Grid::new(SLOT_PAGES as u32, 1), &uses, k)
                    .and_then(|mut l| l.wait_timeout(Duration::from_secs(60)));
                if let Err(e) = r {
                    counts[7].fetch_add(1, Ordering::Relaxed);
                    panic!("kernel on a live slot failed: {e}");
                }
                if let Some(m) = bad.lock().unwrap().take() {
                    panic!("device read a wrong byte: {m}");
                }
                *s = Slot::Live(new);
                counts[5].fetch_add(1, Ordering::Relaxed);
            }
            let _ = Proc::Cpu;
        }));
    }

    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(100));
        if threads.iter().any(|t| t.is_finished()) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut failed = false;
    for t in threads {
        failed |= t.join().is_err();
    }
    assert!(!failed, "a worker failed");
    // Every surviving byte, read by the CPU at the end.
    for i in 0..nslots {
        if let Slot::Live(g) = *area.slots[i].lock().unwrap() {
            check_cpu(area.addr(i), g);
        }
    }
    let c: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    eprintln!(
        "stress {policy} {secs}s: {} maps, {} unmaps, {} remaps, {} discards, {} CPU check+writes, {} kernel check+writes, {} migrations",
        c[0], c[1], c[2], c[3], c[4], c[5], c[6]
    );
    assert!(c[0] > 0 && c[1] > 0 && c[2] > 0 && c[3] > 0 && c[4] > 0 && c[5] > 0);
    // Every CPU fault in shared memory was served (a failure poisons or retries the page, which
    // the byte checks above might not notice).
    assert_eq!(hm.stats().cpu_fault_errors, 0, "hetmm failed to serve CPU faults");
    // Slot by slot: a slot another mapping took is not ours to unmap.
    for i in 0..nslots {
        if *area.slots[i].lock().unwrap() != Slot::Gone {
            // SAFETY: every worker is joined; a slot not Gone is our mapping or placeholder,
            // unreferenced.
            unsafe { libc::munmap(area.addr(i) as *mut _, SLOT) };
        }
    }
}

/// `register` of private memory whose last page is a file mapping past the end of its file
/// (the program gets SIGBUS there too) is refused, and leaves every part as it was: the copy into
/// the memfd read that page directly and the manager died of SIGBUS.
#[test]
fn register_of_a_file_mapping_past_its_end_is_refused_and_changes_nothing() {
    let (hm, _dev) = setup(16 << 20);
    let len = 4 * PS;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a new anonymous mapping where the kernel chooses replaces no existing mapping.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the first two of the four pages just mapped read-write, used only by this thread.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x11, 2 * PS) };
    // Two anonymous pages, then two pages of a file of 100 bytes.
    // SAFETY: the path is a NUL-terminated C string literal; O_TMPFILE takes the mode given.
    let fd = unsafe { libc::open(c"/tmp".as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
    assert!(fd >= 0);
    let data = [0x22u8; 100];
    // SAFETY: `data` is a live buffer of `data.len()` bytes; `fd` is the file just opened.
    assert_eq!(unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), 0) }, data.len() as isize);
    // SAFETY: two pages into the four-page mapping at `p`: in bounds.
    let file = unsafe { p.cast::<u8>().add(2 * PS) };
    // SAFETY: MAP_FIXED replaces only the last two pages of our own mapping at `p`, which nothing
    // refers to.
    let q = unsafe { libc::mmap(file.cast(), 2 * PS, rw, libc::MAP_PRIVATE | libc::MAP_FIXED, fd, 0) };
    assert_eq!(q, file.cast());
    // SAFETY: `fd` is the file this test opened, closed once; the mapping keeps its own reference.
    unsafe { libc::close(fd) };
    let maps = || -> Vec<String> {
        let m = common::maps_meeting(p as u64, p as u64 + len as u64);
        m.iter().map(|m| format!("{:x}-{:x} {}", m.start, m.end, m.perms)).collect()
    };
    let before = maps();
    assert!(hm.register(p.cast(), len).is_err(), "the last page cannot be read");
    assert_eq!(maps(), before, "every part still mapped as before");
    assert!(hm.space().check_span(p as u64, len as u64).is_err(), "not shared");
    // SAFETY: the first anonymous page of our mapping, still mapped as before (checked above).
    assert_eq!(unsafe { *(p as *const u8) }, 0x11);
    // SAFETY: byte 99 of the file mapping lies within the 100-byte file, so it reads without
    // SIGBUS.
    assert_eq!(unsafe { *file.add(99) }, 0x22);
    // The readable part alone registers.
    hm.register(p.cast(), 3 * PS).unwrap();
    hm.unregister(p.cast(), 3 * PS).unwrap();
    // SAFETY: as above; unregister left the mapping private and in place.
    assert_eq!(unsafe { *file.add(99) }, 0x22);
    // SAFETY: unmaps only the four pages this test mapped (anonymous and file); nothing refers to
    // them.
    unsafe { libc::munmap(p, len) };
}

/// An `mremap` of device-resident registered memory copies nothing: the device's copies travel
/// with their blocks (moved by a multiple of 2 MiB) or page by page (moved by one page more),
/// the device no longer reaches the old addresses, a kernel at the new addresses finds the data
/// in place, and the CPU reads every word there.
#[test]
fn mremap_carries_device_data_by_blocks_or_pages() {
    const BLOCK: usize = 2 << 20;
    let word = |i: usize| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for shift in [0, PS] {
        let (hm, dev) = setup(64 << 20);
        let len = 4 * BLOCK;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: new anonymous mappings where the kernel chooses replace no existing mapping.
        let src = unsafe { libc::mmap(std::ptr::null_mut(), len + BLOCK, rw, anon, -1, 0) };
        // SAFETY: as above (a PROT_NONE reservation).
        let dst = unsafe { libc::mmap(std::ptr::null_mut(), len + 2 * BLOCK, libc::PROT_NONE, anon, -1, 0) };
        assert!(src != libc::MAP_FAILED && dst != libc::MAP_FAILED);
        let p = (src as usize).next_multiple_of(BLOCK);
        let q = (dst as usize).next_multiple_of(BLOCK) + shift;
        // SAFETY: `[p, p + len)` lies inside the fresh (zero-filled) read-write mapping `src` of
        // `len + BLOCK` bytes, `p` rounded up to a block; only this thread uses it.
        let words = unsafe { std::slice::from_raw_parts_mut(p as *mut u64, len / 8) };
        for (i, w) in words.iter_mut().enumerate() {
            *w = word(i);
        }
        hm.register(p as *const u8, len).unwrap();
        hm.migrate(p as u64, len as u64, dev.proc()).unwrap();
        let before = hm.stats();
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        // SAFETY: moves our `[p, p + len)` (`words` no longer used) into our PROT_NONE reservation
        // `dst`: `q + len <= dst + len + 2 * BLOCK`, so nothing else is replaced.
        let moved = unsafe { libc::mremap(p as *mut _, len, len, flags, q as *mut libc::c_void) };
        assert_eq!(moved as usize, q);
        hm.space().settle().unwrap();
        let d = hm.stats().since(&before);
        let pages = (len / PS) as u64;
        if shift == 0 {
            assert_eq!((d.bytes_to_host, d.reshape_blocks_kept), (0, 4), "the blocks moved with their copies");
        } else {
            assert_eq!((d.bytes_to_host, d.reshape_pages_rekeyed), (0, pages), "the pages moved with their copies");
        }
        let (stale, k) = load_word(p as u64);
        let r = common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30));
        assert!(r.is_err(), "the device read {:#x} at the old address", stale.load(Ordering::SeqCst));
        // One word per page, read by a kernel at the new addresses.
        let before = hm.stats();
        let wrong = Arc::new(AtomicU64::new(0));
        let w2 = Arc::clone(&wrong);
        let k = move |ctx: &BlockCtx| {
            for page in 0..len / PS {
                if ctx.load::<u64>((q + page * PS) as u64)? != word(page * PS / 8) {
                    w2.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        };
        common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
        assert_eq!(wrong.load(Ordering::Relaxed), 0, "pages the kernel read wrong (shift {shift})");
        assert_eq!(hm.stats().since(&before).bytes_to_device, 0, "the kernel found its data in place");
        // SAFETY: `[q, q + len)` is the moved read-write mapping, ours and mapped; only this thread
        // uses it.
        let words = unsafe { std::slice::from_raw_parts(q as *const u64, len / 8) };
        for (i, w) in words.iter().enumerate() {
            assert_eq!(*w, word(i), "word {i} at the new address (shift {shift})");
        }
        hm.unregister(q as *const u8, len).unwrap();
        let (free, total) = hm.space().device_memory(dev.id()).unwrap();
        assert_eq!(free, total, "every device page that travelled was freed in the end (shift {shift})");
        // Only what is left of the source: the range the buffer left is a hole, where a thread
        // started since may have its stack.
        // SAFETY: unmaps only what is left of our own mappings `src` and `dst` (the moved buffer,
        // no longer referenced, inside `dst`); the hole the move left in `src` is not touched.
        unsafe {
            libc::munmap(src, p - src as usize);
            libc::munmap((p + len) as *mut _, src as usize + len + BLOCK - (p + len));
            libc::munmap(dst, len + 2 * BLOCK);
        }
    }
}

/// `realloc` of malloc'd memory whose pages were registered and moved to a device: glibc cannot
/// `mremap` the chunk (registration split it into several mappings), so it copies the data to
/// a new chunk and unmaps the old one. Every byte arrives, read back from the device through
/// CPU faults, and the unmapped registration leaves hetmm.
#[test]
fn realloc_of_registered_device_resident_memory_keeps_every_byte() {
    let (hm, dev) = setup(64 << 20);
    let len = 8 << 20;
    // SAFETY: malloc has no preconditions; the result is checked for null below.
    let p = unsafe { libc::malloc(len) } as *mut u8;
    assert!(!p.is_null());
    let bytes = |i: usize| (i / PS) as u8 ^ (i % 251) as u8;
    for i in 0..len {
        // SAFETY: `i < len`, inside the malloc'd chunk, which only this thread uses.
        unsafe { p.add(i).write(bytes(i)) };
    }
    // The whole pages inside the chunk (malloc's pointer is not page aligned).
    let a = (p as usize).next_multiple_of(PS);
    let n = (p as usize + len) / PS * PS - a;
    hm.register(a as *const u8, n).unwrap();
    hm.migrate(a as u64, n as u64, dev.proc()).unwrap();
    let before = hm.stats();
    // SAFETY: `p` is the live chunk from malloc above (its registered pages still mapped and
    // readable); nothing refers to it after.
    let q = unsafe { libc::realloc(p.cast(), 2 * len) } as *mut u8;
    assert!(!q.is_null());
    hm.space().settle().unwrap();
    for i in 0..len {
        // SAFETY: `i < len`, inside the `2 * len`-byte chunk realloc returned, whose first `len`
        // bytes it copied.
        assert_eq!(unsafe { q.add(i).read() }, bytes(i), "byte {i}");
    }
    // SAFETY: `[len, 2 * len)` is the second half of the new chunk, in bounds.
    unsafe { std::ptr::write_bytes(q.add(len), 0x11, len) };
    assert!(hm.stats().since(&before).bytes_to_host >= (n as u64) / 2, "the data came back from the device");
    if q != p {
        assert!(hm.space().check_span(a as u64, n as u64).is_err(), "the old registration is gone");
    }
    // SAFETY: `q` is the chunk realloc returned, freed once and not used after.
    unsafe { libc::free(q.cast()) };
}

/// The inode of the file `/proc/self/maps` shows at `va` (0 if none).
fn inode_at(va: usize) -> u64 {
    common::maps_meeting(va as u64, va as u64 + 1).first().map_or(0, |m| m.ino)
}

/// Whether the process still maps or holds open the file of inode `ino` (a memfd of hetmm).
fn file_alive(ino: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mapped = common::maps().iter().any(|m| m.ino == ino);
    let open = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:")))
        .any(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == ino));
    mapped || open
}

/// After the program dropped and unmapped all of a buffer's memory: the memfd `ino` is closed and
/// unmapped, and the device's memory is all free again.
fn all_freed(hm: &Hetmm, dev: &hetmm::Device<SimDevice>, ino: u64, what: &str) {
    hm.space().settle().unwrap();
    assert!(!file_alive(ino), "{what}");
    let (free, total) = hm.space().device_memory(dev.id()).unwrap();
    assert_eq!(free, total, "device memory freed ({what})");
}

/// Moves page 1 of the view at `p` (no slice of it alive) over the test's placeholder page `x`
/// and back. Between the two, a placeholder of the test's own fills the hole, so that moving the
/// page back replaces nothing of other threads' (which may map there meanwhile: then the test
/// cannot go on, and this returns false with the moved page unmapped).
fn page_away_and_back(p: usize, x: usize) -> bool {
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let fixed = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    // SAFETY: moves page 1 of the caller's view over its placeholder `x`.
    let out = unsafe { libc::mremap((p + PS) as *mut _, PS, PS, fixed, x as *mut libc::c_void) } as usize;
    assert_eq!(out, x);
    // SAFETY: FIXED_NOREPLACE maps only where nothing is mapped: it replaces no mapping.
    let hole = unsafe { libc::mmap((p + PS) as *mut _, PS, libc::PROT_NONE, anon | libc::MAP_FIXED_NOREPLACE, -1, 0) }
        as usize;
    if hole != p + PS {
        eprintln!("another thread mapped the hole the page left: skipped");
        // SAFETY: the moved page, the test's mapping now; not used after.
        unsafe { libc::munmap(x as *mut _, PS) };
        return false;
    }
    // SAFETY: moves the page back over the test's placeholder in the hole.
    let back = unsafe { libc::mremap(x as *mut _, PS, PS, fixed, (p + PS) as *mut libc::c_void) } as usize;
    assert_eq!(back, p + PS, "{}", std::io::Error::last_os_error());
    true
}

/// Maps one page of the test's own at `va` (which must be free) holding `byte`; false if some
/// other thread's mapping took the address meanwhile.
fn own_page_at(va: usize, byte: u8) -> bool {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
    // SAFETY: FIXED_NOREPLACE maps only where nothing is mapped: it replaces no mapping.
    let p = unsafe { libc::mmap(va as *mut _, PS, rw, flags, -1, 0) };
    if p as usize != va {
        return false;
    }
    // SAFETY: the page just mapped, read-write, the test's own.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), byte, PS) };
    true
}

/// A kernel of one thread that counts the words of `pages` pages from `va` (one word per page)
/// that differ from `want(page)`.
fn count_wrong(
    va: usize,
    pages: usize,
    want: impl Fn(usize) -> u64 + Send + Sync + 'static,
) -> (Arc<AtomicU64>, impl Fn(&BlockCtx) -> Result<(), DeviceError> + Send + Sync + 'static) {
    let wrong = Arc::new(AtomicU64::new(0));
    let w = Arc::clone(&wrong);
    (wrong, move |ctx: &BlockCtx| {
        for page in 0..pages {
            if ctx.load::<u64>((va + page * PS) as u64)? != want(page) {
                w.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    })
}

/// Memory from `Hetmm::alloc` the program moves with `mremap` (MAYMOVE | FIXED, by whole blocks
/// and by one page more) is followed, as any mapping's data is: its data, half of it on the
/// device at the time, is at the new address for the CPU and for device kernels, `migrate` works
/// there, and the old range leaves hetmm. Dropping the buffer afterwards leaves both alone: the
/// moved memory (the program's mapping now, still managed) and what the program mapped at the
/// old address; once the program unmaps the moved memory too, hetmm's memfd and alias are gone.
#[test]
fn mremap_of_allocated_memory_is_followed() {
    const BLOCK: usize = 2 << 20;
    let word = |i: usize| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for shift in [0, PS] {
        let (hm, dev) = setup(64 << 20);
        let len = 2 * BLOCK;
        let mut buf = hm.alloc::<u64>(len / 8).unwrap();
        for (i, w) in buf.as_mut_slice().iter_mut().enumerate() {
            *w = word(i);
        }
        let p = buf.ptr() as usize;
        hm.migrate(p as u64, BLOCK as u64, dev.proc()).unwrap();
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a new PROT_NONE reservation where the kernel chooses replaces no mapping.
        let dst = unsafe { libc::mmap(std::ptr::null_mut(), len + 2 * BLOCK, libc::PROT_NONE, anon, -1, 0) };
        assert_ne!(dst, libc::MAP_FAILED);
        let q = (dst as usize).next_multiple_of(BLOCK) + shift;
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        // SAFETY: moves the buffer's view (no slice of it is alive) into our PROT_NONE reservation
        // `dst`: `q + len <= dst + len + 2 * BLOCK`, so nothing else is replaced.
        let moved = unsafe { libc::mremap(p as *mut _, len, len, flags, q as *mut libc::c_void) };
        assert_eq!(moved as usize, q, "{}", std::io::Error::last_os_error());
        hm.space().settle().unwrap();
        assert!(hm.space().check_span(p as u64, len as u64).is_err(), "the old range left hetmm");
        let ino = inode_at(q);
        // A device kernel at the new address (the first block's copies travelled or came home).
        let (wrong, k) = count_wrong(q, len / PS, move |page| word(page * PS / 8));
        common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
        assert_eq!(wrong.load(Ordering::Relaxed), 0, "words a kernel read wrong at the new address (shift {shift})");
        // The CPU at the new address reads every word (faulting the data back) and writes.
        let check = |q: usize, gen: u64| {
            // SAFETY: `[q, q + len)` is the moved read-write mapping, ours and mapped; only this
            // thread uses it.
            let words = unsafe { std::slice::from_raw_parts(q as *const u64, len / 8) };
            for (i, w) in words.iter().enumerate() {
                assert_eq!(*w, word(i) ^ gen, "word {i} at the new address (shift {shift}, gen {gen})");
            }
        };
        check(q, 0);
        // SAFETY: as above, written.
        let words = unsafe { std::slice::from_raw_parts_mut(q as *mut u64, len / 8) };
        words.iter_mut().for_each(|w| *w ^= 6);
        // `migrate` at the new address, and back by CPU faults.
        hm.migrate(q as u64, len as u64, dev.proc()).unwrap();
        let (wrong, k) = count_wrong(q, len / PS, move |page| word(page * PS / 8) ^ 6);
        common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
        assert_eq!(wrong.load(Ordering::Relaxed), 0, "words a kernel read wrong after migrate (shift {shift})");
        check(q, 6);
        // The program maps a page of its own where the buffer was, then drops the buffer.
        let mine = own_page_at(p, 0x5A);
        drop(buf);
        if mine {
            // SAFETY: the page mapped by `own_page_at` above, which nothing else unmaps.
            let b = unsafe { (p as *const u8).read_volatile() };
            assert_eq!(b, 0x5A, "dropping the buffer took the program's page");
            // SAFETY: the test's own page.
            unsafe { libc::munmap(p as *mut _, PS) };
        }
        // The moved memory is still managed and whole.
        hm.migrate(q as u64, len as u64, dev.proc()).unwrap();
        check(q, 6);
        assert!(file_alive(ino), "the moved memory's memfd");
        // SAFETY: unmaps our reservation `dst`, holding the moved memory (not referenced after).
        unsafe { libc::munmap(dst, len + 2 * BLOCK) };
        all_freed(&hm, &dev, ino, "the memfd of a buffer dropped and unmapped is still open or mapped");
    }
}

/// One page of a buffer from `Hetmm::alloc`, on the device, moved with a plain `mremap`
/// (MAYMOVE, the kernel picks the address; grown to two pages, so that it must move): its data
/// is there for the CPU and for a kernel, the page it grew by is fresh memory, the rest of the
/// buffer stays managed where it is, and dropping the buffer frees the rest (both regions around
/// the hole) and leaves the moved page, and whatever the program put in the hole, alone.
#[test]
fn mremap_of_one_page_of_allocated_memory_is_followed() {
    let (hm, dev) = setup(16 << 20);
    let pages = 4;
    let word = |page: usize| 0x1111_1111_1111_1111u64 * (page as u64 + 1);
    let mut buf = hm.alloc::<u64>(pages * PS / 8).unwrap();
    for (i, w) in buf.as_mut_slice().iter_mut().enumerate() {
        *w = word(i * 8 / PS);
    }
    let p = buf.ptr() as usize;
    hm.migrate(p as u64, (pages * PS) as u64, dev.proc()).unwrap();
    // SAFETY: moves page 1 of the buffer's view (no slice of it is alive) to where the kernel
    // picks, grown by a page (page 2 of the view is in the way: it moves): nothing is replaced.
    let q = unsafe { libc::mremap((p + PS) as *mut _, PS, 2 * PS, libc::MREMAP_MAYMOVE) } as usize;
    assert_ne!(q, libc::MAP_FAILED as usize, "{}", std::io::Error::last_os_error());
    assert_ne!(q, p + PS, "the page moved");
    hm.space().settle().unwrap();
    // SAFETY: the page the move grew by, mapped read-write; only this thread uses it.
    let fresh = unsafe { std::slice::from_raw_parts_mut((q + PS) as *mut u8, PS) };
    assert!(fresh.iter().all(|&b| b == 0), "the page grown by reads as zeros");
    fresh.fill(0xEE);
    let ino = inode_at(q);
    let (wrong, k) = count_wrong(q, 1, move |_| word(1));
    common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "a kernel read the moved page wrong");
    // SAFETY: the moved page, read-write, mapped at `q`; only this thread uses it.
    let moved = unsafe { std::slice::from_raw_parts_mut(q as *mut u64, PS / 8) };
    assert!(moved.iter().all(|&w| w == word(1)), "the moved page read by the CPU");
    moved[3] = 42;
    hm.migrate(q as u64, PS as u64, dev.proc()).unwrap();
    let (got, k) = load_word(q as u64 + 24);
    common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
    assert_eq!(got.load(Ordering::SeqCst), 42, "the CPU's write, migrated");
    // The rest of the buffer: pages 0, 2 and 3, by the CPU and by a kernel.
    for page in [0, 2, 3] {
        // SAFETY: a page of the buffer's view still mapped (only page 1 moved).
        assert_eq!(unsafe { ((p + page * PS) as *const u64).read_volatile() }, word(page), "page {page}");
    }
    hm.migrate((p + 2 * PS) as u64, (2 * PS) as u64, dev.proc()).unwrap();
    let (wrong, k) = count_wrong(p + 2 * PS, 2, move |i| word(2 + i));
    common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "the rest of the buffer on the device");
    let mine = own_page_at(p + PS, 0xA5);
    drop(buf);
    assert!(!hm.space().any_shared(hetmm::core::types::VaRange::new(p as u64, (pages * PS) as u64)));
    if mine {
        // SAFETY: the page `own_page_at` mapped in the hole, which nothing else unmaps.
        assert_eq!(unsafe { ((p + PS) as *const u8).read_volatile() }, 0xA5, "the program's page in the hole");
        // SAFETY: the test's own page.
        unsafe { libc::munmap((p + PS) as *mut _, PS) };
    }
    // SAFETY: the moved page, still mapped and managed.
    assert_eq!(unsafe { ((q + 24) as *const u64).read_volatile() }, 42, "the moved page after the drop");
    assert!(file_alive(ino));
    // SAFETY: the page grown by, still mapped.
    assert_eq!(unsafe { ((q + PS) as *const u8).read_volatile() }, 0xEE, "the page grown by after the drop");
    // SAFETY: the moved page and the one it grew by, the program's (this test's) mapping now;
    // not used after.
    unsafe { libc::munmap(q as *mut _, 2 * PS) };
    all_freed(&hm, &dev, ino, "the buffer's memfd outlived the buffer and its moved page");
}

/// Registered private memory grown in place with `mremap` (with and without MAYMOVE: the kernel
/// extends the mapping where the addresses after it are free, and raises no event): the new
/// part is fresh memory the program owns (zeros, read and written by the CPU, no SIGBUS), and
/// the registered part stays managed, its data coming back from the device. A new part first
/// touched after `unregister` is fresh memory too.
#[test]
fn registered_memory_grown_in_place_is_plain_memory_there() {
    for (flags, touch_first) in [(0, true), (libc::MREMAP_MAYMOVE, true), (0, false)] {
        let (hm, dev) = setup(16 << 20);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // Eight pages, the last four given back to make room to grow (another thread may map
        // something there meanwhile: then the test tries again).
        let p = (0..20)
            .find_map(|_| {
                // SAFETY: a new mapping where the kernel chooses replaces no mapping.
                let p = unsafe { libc::mmap(std::ptr::null_mut(), 8 * PS, rw, anon, -1, 0) } as usize;
                assert_ne!(p, libc::MAP_FAILED as usize);
                // SAFETY: the last four pages of the test's mapping just made.
                unsafe { libc::munmap((p + 4 * PS) as *mut _, 4 * PS) };
                // SAFETY: the test's own first four pages.
                unsafe { std::ptr::write_bytes(p as *mut u8, 0x3C, 4 * PS) };
                hm.register(p as *const u8, 4 * PS).unwrap();
                hm.migrate(p as u64, (4 * PS) as u64, dev.proc()).unwrap();
                // With MAYMOVE the kernel may move instead of growing in place: then it tries again.
                // SAFETY: grows the test's registered pages into the addresses it freed; no Rust
                // reference points into them.
                let r = unsafe { libc::mremap(p as *mut _, 4 * PS, 8 * PS, flags) } as usize;
                if r == p {
                    return Some(p);
                }
                hm.space().settle().unwrap();
                let at = if r == libc::MAP_FAILED as usize { p } else { r };
                let _ = hm.unregister(at as *const u8, 4 * PS);
                // SAFETY: the test's own mapping, wherever it is now (not used after).
                unsafe { libc::munmap(at as *mut _, if at == p { 4 * PS } else { 8 * PS }) };
                None
            })
            .expect("room to grow in place");
        let grown = p + 4 * PS;
        let touch = || {
            // SAFETY: the grown part of the test's mapping, read-write: fresh memory.
            let new = unsafe { std::slice::from_raw_parts_mut(grown as *mut u8, 4 * PS) };
            assert!(new.iter().all(|&b| b == 0), "the grown part reads as fresh zeros (flags {flags})");
            new.fill(0x77);
            assert!(new.iter().all(|&b| b == 0x77));
        };
        if touch_first {
            touch();
        }
        // SAFETY: the registered part of the mapping: its data comes back from the device.
        let old = unsafe { std::slice::from_raw_parts(p as *const u8, 4 * PS) };
        assert!(old.iter().all(|&b| b == 0x3C), "the registered part (flags {flags})");
        hm.migrate(p as u64, (4 * PS) as u64, dev.proc()).unwrap();
        let (got, k) = load_word(p as u64);
        common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
        assert_eq!(got.load(Ordering::SeqCst), 0x3C3C_3C3C_3C3C_3C3C);
        assert!(hm.space().check_span(grown as u64, PS as u64).is_err(), "the grown part is not managed");
        hm.unregister(p as *const u8, 4 * PS).unwrap();
        if !touch_first {
            touch();
        }
        // SAFETY: the whole mapping, private memory again.
        let all = unsafe { std::slice::from_raw_parts(p as *const u8, 8 * PS) };
        assert!(all[..4 * PS].iter().all(|&b| b == 0x3C) && all[4 * PS..].iter().all(|&b| b == 0x77));
        // SAFETY: the test's own mapping, not used after.
        unsafe { libc::munmap(p as *mut _, 8 * PS) };
    }
}

/// A buffer from `Hetmm::alloc` whose view the program grows in place with `mremap`: the new
/// part is fresh memory the program owns, touched before the buffer is dropped or only after,
/// and dropping the buffer leaves it mapped.
#[test]
fn allocated_memory_grown_in_place_is_plain_memory_there() {
    for touch_first in [true, false] {
        let (hm, _dev) = setup(16 << 20);
        let mut buf = hm.alloc::<u8>(4 * PS).unwrap();
        buf.as_mut_slice().fill(0x3C);
        let p = buf.ptr() as usize;
        // SAFETY: grows the buffer's view in place (no MAYMOVE: nothing is replaced, and it fails
        // if another mapping follows the view); no slice of it is alive.
        let r = unsafe { libc::mremap(p as *mut _, 4 * PS, 8 * PS, 0) } as usize;
        if r != p {
            eprintln!("no room after the buffer's view to grow in place: skipped");
            continue;
        }
        let grown = p + 4 * PS;
        let touch = || {
            // SAFETY: the grown part of the view, read-write: fresh memory.
            let new = unsafe { std::slice::from_raw_parts_mut(grown as *mut u8, 4 * PS) };
            assert!(new.iter().all(|&b| b == 0), "the grown part reads as fresh zeros");
            new.fill(0x77);
        };
        if touch_first {
            touch();
        }
        assert!(buf.as_slice().iter().all(|&b| b == 0x3C), "the buffer");
        drop(buf);
        if !touch_first {
            touch();
        }
        // SAFETY: the grown part, the program's memory, still mapped after the drop.
        let new = unsafe { std::slice::from_raw_parts(grown as *const u8, 4 * PS) };
        assert!(new.iter().all(|&b| b == 0x77), "the grown part after the drop");
        // SAFETY: the test's own grown part, not used after.
        unsafe { libc::munmap(grown as *mut _, 4 * PS) };
    }
}

/// A page of a buffer moved away and back to where it was (the kernel merges it with the rest of
/// the view again): the whole buffer keeps its data, the moved page stays managed, and the
/// buffer's other pages are still the buffer's.
#[test]
fn a_page_of_a_buffer_moved_away_and_back_keeps_every_byte() {
    let (hm, dev) = setup(16 << 20);
    let pages = 4;
    let mut buf = hm.alloc::<u8>(pages * PS).unwrap();
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i / PS) as u8 + 1;
    }
    let p = buf.ptr() as usize;
    hm.migrate(p as u64, (pages * PS) as u64, dev.proc()).unwrap();
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a new PROT_NONE page where the kernel chooses replaces no mapping.
    let x = unsafe { libc::mmap(std::ptr::null_mut(), PS, libc::PROT_NONE, anon, -1, 0) } as usize;
    if !page_away_and_back(p, x) {
        return;
    }
    hm.space().settle().unwrap();
    for (i, &b) in buf.as_slice().iter().enumerate() {
        assert_eq!(b, (i / PS) as u8 + 1, "byte {i}");
    }
    hm.migrate(p as u64, PS as u64, dev.proc()).unwrap();
    hm.migrate((p + PS) as u64, PS as u64, dev.proc()).unwrap();
    hm.migrate((p + 2 * PS) as u64, (2 * PS) as u64, dev.proc()).unwrap();
    for (i, &b) in buf.as_slice().iter().enumerate() {
        assert_eq!(b, (i / PS) as u8 + 1, "byte {i} after migrating");
    }
    drop(buf);
    // The moved page is the program's own mapping now (in the middle of what was the view).
    // SAFETY: page 1, moved back by the test and still mapped.
    assert_eq!(unsafe { ((p + PS) as *const u8).read_volatile() }, 2);
    // SAFETY: the test's page, not used after.
    unsafe { libc::munmap((p + PS) as *mut _, PS) };
}

/// Memory moved out of a buffer is the program's, like memory it registered: `unregister` gives
/// it back as private memory holding its bytes (those on the device included), and hetmm's
/// memfd goes with the buffer.
#[test]
fn memory_moved_out_of_a_buffer_can_be_unregistered() {
    let (hm, dev) = setup(16 << 20);
    let len = 4 * PS;
    let mut buf = hm.alloc::<u8>(len).unwrap();
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let p = buf.ptr() as usize;
    hm.migrate(p as u64, len as u64, dev.proc()).unwrap();
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a new PROT_NONE placeholder where the kernel chooses replaces no mapping.
    let q = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, anon, -1, 0) } as usize;
    assert_ne!(q, libc::MAP_FAILED as usize);
    let fixed = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    // SAFETY: moves the buffer's view (no slice of it alive) over the test's placeholder `q`.
    let r = unsafe { libc::mremap(p as *mut _, len, len, fixed, q as *mut libc::c_void) } as usize;
    assert_eq!(r, q, "{}", std::io::Error::last_os_error());
    hm.space().settle().unwrap();
    let ino = inode_at(q);
    drop(buf);
    hm.unregister(q as *const u8, len).unwrap();
    assert!(!hm.space().any_shared(hetmm::core::types::VaRange::new(q as u64, len as u64)));
    // SAFETY: `[q, q + len)`, private read-write memory of the test's now.
    let bytes = unsafe { std::slice::from_raw_parts(q as *const u8, len) };
    assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "the bytes, given back");
    all_freed(&hm, &dev, ino, "the memfd outlived the buffer and its moved memory");
    // SAFETY: the test's own mapping, not used after.
    unsafe { libc::munmap(q as *mut _, len) };
}

/// Registered memory the program shrinks with `mremap` and then grows in place again (as
/// `realloc` may): the regrown part is fresh memory (zeros), not the data of the pages the
/// shrink gave up, and no access raises SIGBUS; the part still registered keeps its data.
#[test]
fn registered_memory_shrunk_and_regrown_in_place_is_fresh_there() {
    let (hm, dev) = setup(16 << 20);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a new mapping where the kernel chooses replaces no mapping.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), 4 * PS, rw, anon, -1, 0) } as usize;
    assert_ne!(p, libc::MAP_FAILED as usize);
    // SAFETY: the test's own four pages.
    unsafe { std::ptr::write_bytes(p as *mut u8, 0x3C, 4 * PS) };
    hm.register(p as *const u8, 4 * PS).unwrap();
    hm.migrate(p as u64, (4 * PS) as u64, dev.proc()).unwrap();
    // SAFETY: shrinks the test's registered mapping in place (its last two pages go).
    let r = unsafe { libc::mremap(p as *mut _, 4 * PS, 2 * PS, 0) } as usize;
    assert_eq!(r, p, "{}", std::io::Error::last_os_error());
    hm.space().settle().unwrap();
    // SAFETY: grows it in place again into the pages it gave up (fails, and the test skips, if
    // another thread mapped something there meanwhile).
    let r = unsafe { libc::mremap(p as *mut _, 2 * PS, 4 * PS, 0) } as usize;
    if r != p {
        eprintln!("the pages given up were taken meanwhile: skipped");
        hm.unregister(p as *const u8, 2 * PS).unwrap();
        // SAFETY: the test's own mapping, not used after.
        unsafe { libc::munmap(p as *mut _, 2 * PS) };
        return;
    }
    // SAFETY: the regrown part of the test's mapping, read-write.
    let new = unsafe { std::slice::from_raw_parts_mut((p + 2 * PS) as *mut u8, 2 * PS) };
    assert!(new.iter().all(|&b| b == 0), "the regrown part reads as fresh zeros");
    new.fill(0x77);
    // SAFETY: the part still registered.
    let old = unsafe { std::slice::from_raw_parts(p as *const u8, 2 * PS) };
    assert!(old.iter().all(|&b| b == 0x3C), "the registered part");
    hm.unregister(p as *const u8, 2 * PS).unwrap();
    // SAFETY: the test's own mapping, private memory now, not used after.
    let all = unsafe { std::slice::from_raw_parts(p as *const u8, 4 * PS) };
    assert!(all[..2 * PS].iter().all(|&b| b == 0x3C) && all[2 * PS..].iter().all(|&b| b == 0x77));
    // SAFETY: as above.
    unsafe { libc::munmap(p as *mut _, 4 * PS) };
}

/// A page of a buffer moved away and back (the kernel merges it with the rest of the view into
/// one VMA), then the whole buffer moved in one `mremap` spanning the view's parts and the page
/// moved back: the move is followed, every byte is at the new address for the CPU and a kernel,
/// and the old range left hetmm. (The view's parts and the moved page were managed apart, and
/// no one of them held the whole move: the data left management and a touch got SIGBUS.)
#[test]
fn a_move_over_a_page_moved_away_and_back_is_followed() {
    let (hm, dev) = setup(16 << 20);
    let pages = 4;
    let len = pages * PS;
    let mut buf = hm.alloc::<u8>(len).unwrap();
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i / PS) as u8 + 1;
    }
    let p = buf.ptr() as usize;
    hm.migrate(p as u64, len as u64, dev.proc()).unwrap();
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: new PROT_NONE placeholders where the kernel chooses replace no mapping.
    let (x, q) = unsafe {
        (
            libc::mmap(std::ptr::null_mut(), PS, libc::PROT_NONE, anon, -1, 0) as usize,
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, anon, -1, 0) as usize,
        )
    };
    assert!(x != libc::MAP_FAILED as usize && q != libc::MAP_FAILED as usize);
    if !page_away_and_back(p, x) {
        return;
    }
    let fixed = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    // SAFETY: moves the whole view (one VMA again) over the test's placeholder `q`.
    let moved = unsafe { libc::mremap(p as *mut _, len, len, fixed, q as *mut libc::c_void) } as usize;
    assert_eq!(moved, q, "one VMA again: {}", std::io::Error::last_os_error());
    hm.space().settle().unwrap();
    assert!(hm.space().check_span(q as u64, len as u64).is_ok(), "the moved memory is managed");
    assert!(hm.space().check_span(p as u64, PS as u64).is_err(), "the old range left hetmm");
    let (wrong, k) = count_wrong(q, pages, move |page| u64::from_ne_bytes([page as u8 + 1; 8]));
    common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "words a kernel read wrong at the new address");
    // SAFETY: the moved memory, mapped read-write at `q`; only this thread uses it.
    let bytes = unsafe { std::slice::from_raw_parts(q as *const u8, len) };
    for (i, &b) in bytes.iter().enumerate() {
        assert_eq!(b, (i / PS) as u8 + 1, "byte {i} at the new address");
    }
    hm.migrate(q as u64, len as u64, dev.proc()).unwrap();
    // SAFETY: as above.
    assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i / PS) as u8 + 1), "after migrating");
    let ino = inode_at(q);
    drop(buf);
    // SAFETY: the moved memory, the test's mapping now; not used after.
    unsafe { libc::munmap(q as *mut _, len) };
    all_freed(&hm, &dev, ino, "the buffer's memfd outlived the buffer and its moved memory");
}

/// `MREMAP_DONTUNMAP` of hetmm's memory (a buffer from `Hetmm::alloc`, and registered memory):
/// the moved memory is followed, and the old range, which the kernel leaves mapped, is what it
/// is after such a move of private memory, empty: it reads zeros and takes writes (it showed
/// hetmm's memfd, registered, unknown to the core: a touch got SIGBUS). Dropping the buffer or
/// unregistering the moved memory leaves it alone.
#[test]
fn mremap_dontunmap_of_managed_memory_leaves_fresh_memory_behind() {
    for registered in [false, true] {
        let (hm, dev) = setup(16 << 20);
        let len = 4 * PS;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let mut buf = None;
        let p = if registered {
            // SAFETY: a new mapping where the kernel chooses replaces no mapping.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, anon, -1, 0) } as usize;
            assert_ne!(p, libc::MAP_FAILED as usize);
            // SAFETY: the test's own pages.
            unsafe { std::ptr::write_bytes(p as *mut u8, 0x3C, len) };
            hm.register(p as *const u8, len).unwrap();
            p
        } else {
            let mut b = hm.alloc::<u8>(len).unwrap();
            b.as_mut_slice().fill(0x3C);
            let p = b.ptr() as usize;
            buf = Some(b);
            p
        };
        hm.migrate(p as u64, len as u64, dev.proc()).unwrap();
        // SAFETY: a new PROT_NONE placeholder where the kernel chooses replaces no mapping.
        let q = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, anon, -1, 0) } as usize;
        assert_ne!(q, libc::MAP_FAILED as usize);
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP;
        // SAFETY: moves the managed memory (no slice of it alive) over the test's placeholder.
        let r = unsafe { libc::mremap(p as *mut _, len, len, flags, q as *mut libc::c_void) } as usize;
        if r == libc::MAP_FAILED as usize {
            eprintln!("MREMAP_DONTUNMAP of a shared mapping refused ({}): skipped", std::io::Error::last_os_error());
            return;
        }
        assert_eq!(r, q);
        hm.space().settle().unwrap();
        assert!(hm.space().check_span(p as u64, len as u64).is_err(), "the old range left hetmm");
        // SAFETY: the moved memory, read-write at `q`.
        let moved = unsafe { std::slice::from_raw_parts(q as *const u8, len) };
        assert!(moved.iter().all(|&b| b == 0x3C), "the moved memory (registered: {registered})");
        let old = p;
        let touch = move || {
            // SAFETY: the old range, still mapped read-write (MREMAP_DONTUNMAP): fresh memory.
            let old = unsafe { std::slice::from_raw_parts_mut(old as *mut u8, len) };
            let zeros = old.iter().all(|&b| b == 0);
            old.fill(0x77);
            zeros
        };
        // On another thread: a SIGBUS there would kill the test process either way, but a hang
        // shows as a timeout.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(touch());
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true), "the old range reads zeros");
        drop(buf);
        if registered {
            hm.unregister(q as *const u8, len).unwrap();
        }
        // SAFETY: the old range, the test's memory.
        let old = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
        assert!(old.iter().all(|&b| b == 0x77), "the old range after the drop (registered: {registered})");
        // SAFETY: the moved memory.
        assert!(moved.iter().all(|&b| b == 0x3C), "the moved memory after the drop");
        // SAFETY: the test's own mappings, not used after.
        unsafe {
            libc::munmap(p as *mut _, len);
            libc::munmap(q as *mut _, len);
        }
        hm.space().settle().unwrap();
        let (free, total) = hm.space().device_memory(dev.id()).unwrap();
        assert_eq!(free, total, "device memory freed");
    }
}

/// Managed memory grown in place with `mremap` (no event: the new part still shows hetmm's
/// memfd, untouched), after which the program unmaps the managed part and keeps the grown one:
/// the grown part is fresh memory the program owns (zeros, then its writes), no SIGBUS. Both
/// for registered memory and for a buffer from `Hetmm::alloc` (whose drop then leaves it alone).
#[test]
fn a_grown_part_outliving_its_managed_part_is_plain_memory() {
    // Another thread may map something right after the memory meanwhile: then a case is tried
    // again, a few times.
    let mut tries = 0;
    let mut cases = vec![false, true];
    while let Some(registered) = cases.pop() {
        let (hm, dev) = setup(16 << 20);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let mut buf = None;
        let p = if registered {
            // SAFETY: a new mapping where the kernel chooses replaces no mapping.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), 8 * PS, rw, anon, -1, 0) } as usize;
            assert_ne!(p, libc::MAP_FAILED as usize);
            // SAFETY: the test's own first four pages.
            unsafe { std::ptr::write_bytes(p as *mut u8, 0x3C, 4 * PS) };
            hm.register(p as *const u8, 4 * PS).unwrap();
            p
        } else {
            let mut b = hm.alloc::<u8>(4 * PS).unwrap();
            b.as_mut_slice().fill(0x3C);
            let p = b.ptr() as usize;
            buf = Some(b);
            p
        };
        hm.migrate(p as u64, (4 * PS) as u64, dev.proc()).unwrap();
        if registered {
            // SAFETY: the last four pages of the test's mapping (not registered), given back only
            // now (registering and migrating map memory where the kernel picks): room to grow.
            unsafe { libc::munmap((p + 4 * PS) as *mut _, 4 * PS) };
        }
        // SAFETY: grows the managed memory in place (no MAYMOVE: nothing is replaced, and it
        // fails if another mapping follows); no slice of it is alive.
        let r = unsafe { libc::mremap(p as *mut _, 4 * PS, 8 * PS, 0) } as usize;
        if r != p {
            tries += 1;
            if tries < 20 {
                cases.push(registered);
            } else {
                eprintln!(
                    "no room to grow in place (registered: {registered}, {r:#x} {p:#x} {}): skipped",
                    std::io::Error::last_os_error()
                );
            }
            if registered {
                hm.unregister(p as *const u8, 4 * PS).unwrap();
                // SAFETY: the test's own mapping, not used after.
                unsafe { libc::munmap(p as *mut _, 4 * PS) };
            }
            continue;
        }
        // SAFETY: the managed part of the test's mapping (the buffer's view: no slice of it is
        // alive, and the buffer is not used but dropped after).
        unsafe { libc::munmap(p as *mut _, 4 * PS) };
        hm.space().settle().unwrap();
        let grown = p + 4 * PS;
        let touch = move || {
            // SAFETY: the grown part of the mapping, read-write, still mapped: fresh memory.
            let new = unsafe { std::slice::from_raw_parts_mut(grown as *mut u8, 4 * PS) };
            let zeros = new.iter().all(|&b| b == 0);
            new.fill(0x77);
            zeros
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(touch());
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true), "the grown part (registered: {registered})");
        drop(buf);
        // SAFETY: the grown part, still mapped.
        let new = unsafe { std::slice::from_raw_parts(grown as *const u8, 4 * PS) };
        assert!(new.iter().all(|&b| b == 0x77), "the grown part after the drop");
        // SAFETY: the test's own grown part, not used after.
        unsafe { libc::munmap(grown as *mut _, 4 * PS) };
        hm.space().settle().unwrap();
        let (free, total) = hm.space().device_memory(dev.id()).unwrap();
        assert_eq!(free, total, "device memory freed");
    }
}

/// A buffer dropped right after the program moved all its memory away with `mremap` (the move's
/// event read, not yet applied): the moved memory stays managed at its new address with every
/// byte, its device copies included; and a buffer allocated right after the move (the kernel
/// may hand out the addresses just left) is made, not refused as overlapping the old memory.
/// (The drop found the view's region still at the old address and freed it, device data and
/// all; the move's event then found nothing to move: the memory was left registered but unknown
/// to the core, and a touch got SIGBUS.)
#[test]
fn a_buffer_dropped_right_after_its_memory_moved_leaves_that_memory_managed() {
    let (hm, dev) = setup(16 << 20);
    let len = 16 * PS;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let fixed = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    let mut reused = 0;
    for round in 0..20u8 {
        let mut buf = hm.alloc::<u8>(len).unwrap();
        buf.as_mut_slice().fill(round + 1);
        let p = buf.ptr() as usize;
        hm.migrate(p as u64, len as u64, dev.proc()).unwrap();
        // SAFETY: a new PROT_NONE placeholder where the kernel chooses replaces no mapping.
        let q = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, anon, -1, 0) } as usize;
        assert_ne!(q, libc::MAP_FAILED as usize);
        // SAFETY: moves the buffer's whole view (no slice of it alive) over the test's placeholder.
        let r = unsafe { libc::mremap(p as *mut _, len, len, fixed, q as *mut libc::c_void) } as usize;
        assert_eq!(r, q, "{}", std::io::Error::last_os_error());
        // Odd rounds allocate first, then drop.
        let alloc = || hm.alloc::<u8>(len).unwrap_or_else(|e| panic!("round {round}: alloc right after the move: {e}"));
        let next = if round % 2 == 1 {
            let next = alloc();
            drop(buf);
            next
        } else {
            drop(buf);
            alloc()
        };
        reused += u32::from(next.ptr() as usize == p);
        hm.space().settle().unwrap();
        assert!(hm.space().check_span(q as u64, len as u64).is_ok(), "round {round}: the moved memory is managed");
        let (wrong, k) = count_wrong(q, len / PS, move |_| u64::from_ne_bytes([round + 1; 8]));
        common::launch_raw(dev.driver(), Grid::new(1, 1), k).unwrap().wait(Duration::from_secs(30)).unwrap();
        assert_eq!(wrong.load(Ordering::Relaxed), 0, "round {round}: words a kernel read wrong");
        // SAFETY: the moved memory, mapped read-write at `q`, managed (checked above).
        let bytes = unsafe { std::slice::from_raw_parts(q as *const u8, len) };
        assert!(bytes.iter().all(|&b| b == round + 1), "round {round}: the moved bytes");
        drop(next);
        // SAFETY: the test's own mapping now, not used after.
        unsafe { libc::munmap(q as *mut _, len) };
    }
    eprintln!("{reused} of 20 buffers allocated right after a move got the addresses it left");
}

/// Counts `rounds` times into the first word of every page of `[p, p + len)` (plain loads and
/// stores, as a program would), then returns.
fn count_into_pages(p: usize, len: usize, rounds: u64) {
    for _ in 0..rounds {
        for page in (p..p + len).step_by(PS) {
            // SAFETY: the caller's memory, mapped read-write for the whole count; this thread is
            // the only one that writes it.
            unsafe {
                let w = page as *mut u64;
                w.write_volatile(w.read_volatile() + 1);
            }
        }
    }
}

/// A thread goes on writing private memory while another registers it, and then while it
/// unregisters it: no write is lost. Registering copies the bytes into hetmm's memfd and maps
/// the memfd over them, and unregistering copies them back into fresh private memory and moves
/// that over; a write landing between the copy and the replacement went to pages about to be
/// replaced (a counter in each page ended short of the count). The memory is fresh when it is
/// registered: the writer's first round gives pages their first entries during the copy.
#[test]
fn writes_racing_register_and_unregister_are_not_lost() {
    let hm = Arc::new(Hetmm::new().expect("userfaultfd and memfd available"));
    let len = 64 << 20;
    let p = common::private_anon(len);
    // 4 KiB pages: a first round of page faults long enough to race the registration's copy.
    // SAFETY: a hint on the test's own mapping; it changes no content.
    unsafe { libc::madvise(p as *mut _, len, libc::MADV_NOHUGEPAGE) };
    let rounds = 400;
    for step in ["register", "unregister"] {
        if step == "unregister" {
            // (Before the registration it is fresh: the writer's first round touches its pages
            // while they are copied.)
            // SAFETY: the test's own mapping, not written by anyone else now.
            unsafe { std::ptr::write_bytes(p as *mut u8, 0, len) };
        }
        let writer = std::thread::spawn(move || count_into_pages(p, len, rounds));
        // Let the writer get going (into its first round, a page fault per page, when the
        // memory is fresh), then change the memory under it.
        std::thread::sleep(Duration::from_millis(if step == "register" { 1 } else { 5 }));
        match step {
            "register" => assert_eq!(hm.register(p as *const u8, len).unwrap().len, len as u64),
            _ => hm.unregister(p as *const u8, len).unwrap(),
        }
        let raced = !writer.is_finished();
        writer.join().unwrap();
        let short: Vec<usize> = (0..len / PS)
            // SAFETY: page `i` of the test's mapping, which no one writes any more.
            .filter(|i| unsafe { ((p + i * PS) as *const u64).read_volatile() } != rounds)
            .collect();
        assert!(
            short.is_empty(),
            "{step}: {} pages lost writes, the first {:?} (raced: {raced})",
            short.len(),
            &short[..short.len().min(4)]
        );
        eprintln!("{step}: every write kept (the writer was still counting at the end: {raced})");
    }
    // SAFETY: the test's own mapping, unregistered and unused now.
    assert_eq!(unsafe { libc::munmap(p as *mut _, len) }, 0);
}
