//! The CPU's slices and the devices' kernels: what a Rust reference promises the compiler
//! (nothing else writes the memory while a `&[T]` lives, nothing else touches it while a
//! `&mut [T]` does) holds against kernels, advice and drops, whether the launch is waited for,
//! dropped or forgotten. Each conflict is a typed error or a wait; never a slice over memory
//! that changes under it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmm::core::device::DeviceError;
use hetmm::sim::{BlockCtx, Grid, SimConfig, SimDevice};
use hetmm::{Access, Advice, Device, Error, Hetmm, SharedBuf, Use};

mod common;

const WORDS: usize = 4096;
const T: Duration = Duration::from_secs(60);

fn setup() -> (Hetmm, Device<SimDevice>) {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Hetmm::new().expect("userfaultfd and memfd are available");
    let dev =
        hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 16 << 20, ..SimConfig::default() }).unwrap()).unwrap();
    (hm, dev)
}

fn filled(hm: &Hetmm, v: u64) -> SharedBuf<u64> {
    let mut b = hm.alloc::<u64>(WORDS).unwrap();
    b.as_mut_slice().fill(v);
    b
}

/// A kernel that waits (at most `T`) until `go` is set, then writes `v` over `words` words at
/// `at` (or only reads them, if `v` is `None`).
fn gated(at: u64, words: usize, v: Option<u64>, go: &Arc<AtomicBool>) -> impl Fn(&BlockCtx) -> Result<(), DeviceError> {
    let go = Arc::clone(go);
    move |ctx: &BlockCtx| {
        let t = Instant::now();
        while !go.load(Ordering::Acquire) {
            if t.elapsed() > T {
                return Err(DeviceError::Timeout(T));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        match v {
            Some(v) => ctx.write_slice(at, &vec![v; words]),
            None => ctx.read_slice(at, &mut vec![0u64; words]),
        }
    }
}

/// Sets `go` after a while, on another thread: whoever waits for the kernel meanwhile blocks.
fn release_later(go: &Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let go = Arc::clone(go);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        go.store(true, Ordering::Release);
    })
}

fn one() -> Grid {
    Grid::new(1, 1)
}

#[test]
fn a_slice_refuses_kernels_that_would_write_under_it_and_lets_readers_run() {
    let (hm, dev) = setup();
    let b = filled(&hm, 1);
    let go = Arc::new(AtomicBool::new(true));
    let s = b.as_slice();
    match dev.launch(one(), &[Use::write(&b)], gated(b.ptr(), WORDS, Some(2), &go)) {
        Err(Error::InUse { buffer, .. }) => assert_eq!(buffer.start, b.ptr()),
        other => panic!("a kernel writing under a live slice: {other:?}"),
    }
    // A raw use over the buffer is checked alike.
    // SAFETY: the range is the buffer's, which the launch checks (and refuses).
    let raw = unsafe { Use::raw(b.ptr() + 8, 8, Access::Write) };
    assert!(matches!(dev.launch(one(), &[raw], |_: &BlockCtx| Ok(())), Err(Error::InUse { .. })));
    dev.launch(one(), &[Use::read(&b)], gated(b.ptr(), WORDS, None, &go)).unwrap().wait().unwrap();
    assert!(s.iter().all(|&v| v == 1));
    drop(s);
    dev.launch(one(), &[Use::write(&b)], gated(b.ptr(), WORDS, Some(2), &go)).unwrap().wait().unwrap();
    assert!(b.as_slice().iter().all(|&v| v == 2));
}

#[test]
fn slices_wait_for_the_kernels_that_may_change_them() {
    let (hm, dev) = setup();
    let mut b = filled(&hm, 1);
    let go = Arc::new(AtomicBool::new(false));
    let launch = dev.launch(one(), &[Use::write(&b)], gated(b.ptr(), WORDS, Some(3), &go)).unwrap();
    assert!(matches!(b.try_as_slice(), Err(Error::InUse { .. })), "a slice under a running writer");
    assert!(matches!(b.try_as_mut_slice(), Err(Error::InUse { .. })));
    let t = release_later(&go);
    // Waits for the kernel, then sees all it wrote.
    assert!(b.as_slice().iter().all(|&v| v == 3));
    assert!(launch.is_done());
    launch.wait().unwrap();
    t.join().unwrap();

    // A reader leaves `&` slices alone and holds `&mut` ones off.
    go.store(false, Ordering::Release);
    let launch = dev.launch(one(), &[Use::read(&b)], gated(b.ptr(), WORDS, None, &go)).unwrap();
    assert!(b.try_as_slice().unwrap().iter().all(|&v| v == 3));
    assert!(matches!(b.try_as_mut_slice(), Err(Error::InUse { .. })), "a &mut slice under a running reader");
    let t = release_later(&go);
    b.as_mut_slice()[0] = 4;
    assert!(launch.is_done());
    launch.wait().unwrap();
    t.join().unwrap();
}

/// What holds the buffer is the kernel, not its `Launch`: forgetting the launch (safe code can)
/// must not let a slice be taken while the kernel still writes.
#[test]
fn a_forgotten_or_dropped_launch_still_holds_its_buffers() {
    let (hm, dev) = setup();
    let b = filled(&hm, 1);
    for forget in [true, false] {
        let go = Arc::new(AtomicBool::new(false));
        let launch = dev.launch(one(), &[Use::write(&b)], gated(b.ptr(), WORDS, Some(5), &go)).unwrap();
        if forget {
            std::mem::forget(launch);
        } else {
            drop(launch);
        }
        assert!(matches!(b.try_as_slice(), Err(Error::InUse { .. })), "forgotten: {forget}");
        let t = release_later(&go);
        assert!(b.as_slice().iter().all(|&v| v == 5), "forgotten: {forget}");
        t.join().unwrap();
    }
}

#[test]
fn dont_need_is_refused_under_a_slice_and_outside_buffers() {
    let (hm, _dev) = setup();
    let b = filled(&hm, 7);
    let len = b.byte_len();
    let s = b.as_slice();
    assert!(matches!(hm.advise(b.ptr(), len, Advice::DontNeed), Err(Error::InUse { .. })));
    assert!(matches!(hm.advise_buf(&b, Advice::DontNeed), Err(Error::InUse { .. })));
    assert!(s.iter().all(|&v| v == 7), "the refused advice changed nothing");
    // Advice that keeps the bytes is fine under a slice.
    hm.advise_buf(&b, Advice::ReadMostly(true)).unwrap();
    drop(s);
    hm.advise_buf(&b, Advice::DontNeed).unwrap();
    assert!(b.as_slice().iter().all(|&v| v == 0));

    // Registered memory: the program's own references are out of sight, so only the unsafe
    // entry point takes it.
    let len = 1 << 16;
    let own = common::private_anon(len);
    // SAFETY: a fresh private mapping of `len` bytes, this test's own.
    let bytes = |v: u8| unsafe { std::slice::from_raw_parts(own as *const u8, len) }.iter().all(|&x| x == v);
    // SAFETY: as above; no reference to it is alive.
    unsafe { std::ptr::write_bytes(own as *mut u8, 9, len) };
    let r = hm.register(own as *const u8, len).unwrap();
    assert!(matches!(hm.advise(r.start, r.len, Advice::DontNeed), Err(Error::NotBuffers { .. })));
    // A range running from a buffer into other memory is refused whole.
    assert!(matches!(hm.advise(b.ptr(), b.byte_len() + (1 << 30), Advice::DontNeed), Err(Error::NotBuffers { .. })));
    assert!(bytes(9));
    // SAFETY: no reference to the memory is alive (`bytes` makes its own, later).
    unsafe { hm.advise_unchecked(r.start, r.len, Advice::DontNeed) }.unwrap();
    assert!(bytes(0));
    hm.unregister(own as *const u8, len).unwrap();
    // SAFETY: this test's own mapping, unused from here.
    unsafe { libc::munmap(own as *mut _, len) };
}

#[test]
fn a_kernel_touches_only_what_its_launch_declared() {
    let (hm, dev) = setup();
    let (a, b) = (filled(&hm, 1), filled(&hm, 1));
    let go = Arc::new(AtomicBool::new(true));
    let s = b.as_slice();
    // `b` is not declared: the kernel cannot write it under the live slice.
    let r = dev.launch(one(), &[Use::write(&a)], gated(b.ptr(), WORDS, Some(6), &go)).unwrap().wait();
    assert!(matches!(r, Err(Error::Device(DeviceError::Undeclared { access: Access::Write, .. }))), "{r:?}");
    // Declared for reading only: no write either.
    let r = dev.launch(one(), &[Use::read(&a)], gated(a.ptr(), WORDS, Some(6), &go)).unwrap().wait();
    assert!(matches!(r, Err(Error::Device(DeviceError::Undeclared { access: Access::Write, .. }))), "{r:?}");
    assert!(s.iter().all(|&v| v == 1) && a.as_slice().iter().all(|&v| v == 1));
}

#[test]
fn dropping_a_buffer_waits_for_the_kernels_using_it() {
    let (hm, dev) = setup();
    let b = filled(&hm, 1);
    let go = Arc::new(AtomicBool::new(false));
    let launch = dev.launch(one(), &[Use::write(&b)], gated(b.ptr(), WORDS, Some(8), &go)).unwrap();
    let t = release_later(&go);
    drop(b);
    // The kernel ended before the memory went, so it finished its writes.
    assert!(launch.is_done());
    launch.wait().unwrap();
    t.join().unwrap();
}

/// A kernel asking for a slice of the buffer it writes would wait for itself (600 s, then fail):
/// it is told at once instead (`as_slice` panics, which fails the kernel; `try_as_slice` says
/// `InUse`). Found by an audit.
#[test]
fn a_kernel_asking_for_a_slice_of_its_own_buffer_is_told_at_once() {
    let (hm, dev) = setup();
    let b = Arc::new(filled(&hm, 1));
    let (b1, b2) = (Arc::clone(&b), Arc::clone(&b));
    let tried = move |_: &BlockCtx| match b1.try_as_slice() {
        Err(Error::InUse { .. }) => Ok(()),
        other => Err(DeviceError::Other(format!("try_as_slice inside the writer: {:?}", other.map(|s| s[0])))),
    };
    dev.launch(one(), &[Use::write(&b)], tried).unwrap().wait_timeout(T).unwrap();
    let waits = move |_: &BlockCtx| {
        let first = b2.as_slice()[0];
        Err(DeviceError::Other(format!("as_slice inside the writer returned {first}")))
    };
    let r = dev.launch(one(), &[Use::write(&b)], waits).unwrap().wait_timeout(Duration::from_secs(30));
    match r {
        Err(Error::Device(DeviceError::Other(m))) => assert!(m.contains("panicked") && m.contains("in use"), "{m}"),
        other => panic!("as_slice inside the kernel that writes the buffer: {other:?}"),
    }
}

/// A finished kernel that captured a buffer does not keep it: the buffer's list of kernels holds
/// only their ends, not their closures (it made a cycle, and dropping a finished entry under the
/// buffer's lock could drop the buffer itself there, deadlocking; found by an audit).
#[test]
fn a_finished_kernel_keeps_no_buffer_it_captured() {
    let (hm, dev) = setup();
    let b = Arc::new(filled(&hm, 1));
    let at = b.ptr();
    let held = Arc::clone(&b);
    let k = move |ctx: &BlockCtx| ctx.store(held.ptr(), 2u64);
    dev.launch(one(), &[Use::write(&b)], k).unwrap().wait().unwrap();
    let weak = Arc::downgrade(&b);
    drop(b);
    // The workers let the closure go once the last block is done: shortly after the wait.
    let t = Instant::now();
    while weak.strong_count() > 0 && t.elapsed() < T {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(weak.strong_count(), 0, "the finished kernel kept the buffer");
    assert!(hm.space().page_state(at).is_none(), "the buffer's memory is freed");
    // And launching on the memory's next buffer neither hangs nor finds the old one.
    let c = filled(&hm, 3);
    dev.launch(one(), &[Use::write(&c)], move |ctx: &BlockCtx| ctx.store(at, 4u64).or(Ok(()))).unwrap().wait().unwrap();
}

/// A type aligned beyond a buffer's 2 MiB is refused: its slice would be misaligned (found by an
/// audit: the optimizer then folded `ptr % align` to 0).
#[test]
fn a_type_aligned_beyond_a_buffer_is_refused() {
    #[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
    #[repr(C, align(4194304))]
    struct Huge([[u8; 4096]; 1024]);
    let (hm, _dev) = setup();
    match hm.alloc::<Huge>(1) {
        Err(Error::OverAligned { align: 4194304, max: 2097152 }) => {}
        other => panic!("an over-aligned type: {:?}", other.map(|b| b.ptr())),
    }
}

/// A launch lets its kernel's closure go only after the buffers' locks: the closure's captures
/// may take them in their drops (a zero-block grid's closure is dropped by the launch itself;
/// a one-block one now and then). Taken while held, the launching thread deadlocked on itself
/// (found by an audit).
#[test]
fn a_closure_dropped_by_its_launch_may_take_the_buffers_slices() {
    struct SliceOnDrop(Arc<SharedBuf<u64>>);
    impl Drop for SliceOnDrop {
        fn drop(&mut self) {
            let _ = self.0.try_as_slice().map(|s| s[0]);
        }
    }
    let (hm, dev) = setup();
    let b = Arc::new(filled(&hm, 1));
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn({
        let b = Arc::clone(&b);
        move || {
            for blocks in [0, 1] {
                let keep = SliceOnDrop(Arc::clone(&b));
                let k = move |_: &BlockCtx| {
                    let _ = &keep;
                    Ok(())
                };
                let r = dev.launch(Grid::new(blocks, 1), &[Use::read(&b)], k).and_then(|l| l.wait());
                tx.send(r.map_err(|e| e.to_string())).unwrap();
            }
        }
    });
    for blocks in [0, 1] {
        assert_eq!(rx.recv_timeout(T), Ok(Ok(())), "a {blocks}-block launch");
    }
    t.join().unwrap();
}
