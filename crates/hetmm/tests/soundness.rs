//! Safe code against the buffers' guarantees (from an audit): what it found wrong, fixed, and
//! what it tried that held. A hang is reported as a failure after a bounded wait (its thread
//! is left behind; the process still exits).

use std::sync::Arc;
use std::time::Duration;

use hetmm::sim::{BlockCtx, Grid, SimConfig, SimDevice};
use hetmm::{Hetmm, Use};

const WORDS: usize = 512; // one page of u64

fn cfg() -> SimConfig {
    SimConfig { memory_bytes: 16 << 20, ..SimConfig::default() }
}

/// A `Hetmm` with a sim device and a one-page buffer the CPU filled with 5 and a kernel then
/// overwrote with 9: the only copy of the new data is on the device.
fn written_on_the_device() -> (Hetmm, hetmm::Device<SimDevice>, hetmm::SharedBuf<u64>) {
    let (hm, dev, a) = filled_with_5();
    device_fills(&dev, &a, 9);
    (hm, dev, a)
}

/// A `Hetmm` with a sim device and a one-page buffer the CPU filled with 5.
fn filled_with_5() -> (Hetmm, hetmm::Device<SimDevice>, hetmm::SharedBuf<u64>) {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Hetmm::new().unwrap();
    let dev = hm.attach_sim(SimDevice::new(cfg()).unwrap()).unwrap();
    let mut a = hm.alloc::<u64>(WORDS).unwrap();
    a.as_mut_slice().fill(5);
    (hm, dev, a)
}

/// A kernel on `dev` fills `a` with `v`.
fn device_fills(dev: &hetmm::Device<SimDevice>, a: &hetmm::SharedBuf<u64>, v: u64) {
    let ap = a.ptr();
    dev.launch(Grid::new(1, 1), &[Use::write(a)], move |ctx: &BlockCtx| ctx.write_slice(ap, &[v; WORDS]))
        .unwrap()
        .wait()
        .unwrap();
}

/// A second `Hetmm` registers (as shared memory) and unregisters a first one's buffer: safe
/// calls, and the second instance's allocs cannot know the buffer. Its `unregister` drops the
/// userfaultfd registration of the view, which the first instance needs to bring device data
/// back on a CPU access.
#[test]
fn another_instance_unregistering_a_buffer_cuts_it_off_its_device_data() {
    let (_hm, _dev, a) = written_on_the_device();
    {
        let other = Hetmm::new().unwrap();
        let r = other.register(a.ptr() as *const u8, 4096);
        eprintln!("other.register: {r:?}");
        if r.is_ok() {
            let u = other.unregister(a.ptr() as *const u8, 4096);
            eprintln!("other.unregister: {u:?}");
        }
    }
    let seen = a.as_slice()[0];
    assert_eq!(seen, 9, "the buffer reads {seen}, not the kernel's 9");
}

/// The `Hetmm` is dropped while a buffer lives (allowed: "buffers still alive stay managed").
#[test]
fn a_buffer_outliving_its_hetmm_keeps_its_data() {
    let (hm, dev, a) = written_on_the_device();
    drop(dev);
    drop(hm);
    let (tx, rx) = std::sync::mpsc::channel();
    let a = Arc::new(a);
    let a2 = Arc::clone(&a);
    std::thread::spawn(move || {
        let v = a2.as_slice()[0];
        let _ = tx.send(v);
    });
    let seen = rx.recv_timeout(Duration::from_secs(20)).expect("reading the buffer hangs");
    assert_eq!(seen, 9);
}

/// CPU writes through a `BufMut` on one thread while another thread migrates the same memory
/// back and forth (safe `Hetmm::migrate`, `Space::evict_device`): no write may be lost.
#[test]
fn migrations_under_a_live_bufmut_lose_no_write() {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Hetmm::new().unwrap();
    let dev = hm.attach_sim(SimDevice::new(cfg()).unwrap()).unwrap();
    const N: usize = 4 * WORDS; // four pages
    let mut a = hm.alloc::<u64>(N).unwrap();
    let ptr = a.ptr();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let moved = std::sync::atomic::AtomicU64::new(0);
    let last = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if hm.migrate(ptr, (N * 8) as u64, dev.proc()).is_ok() {
                    moved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = hm.space().evict_device(dev.id());
                let _ = hm.make_exclusive(ptr, (N * 8) as u64, &dev);
                let _ = hm.snapshot(ptr, (N * 8) as u64, &dev);
                let _ = hm
                    .advise(ptr, (N * 8) as u64, hetmm::Advice::Prefetch(dev.proc()))
                    .map(|p| p.wait(Duration::from_secs(10)));
            }
        });
        let mut m = a.as_mut_slice();
        let t = std::time::Instant::now();
        let mut round = 0u64;
        while t.elapsed() < Duration::from_secs(3) {
            round += 1;
            for p in 0..4 {
                m[p * WORDS + (round as usize % WORDS)] = round;
            }
            std::thread::yield_now();
            for p in 0..4 {
                let i = p * WORDS + (round as usize % WORDS);
                let v = *std::hint::black_box(&m[i]);
                assert_eq!(v, round, "page {p} word {i}: a write was lost");
            }
        }
        drop(m);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        round
    });
    eprintln!("{last} rounds, {} migrations", moved.load(std::sync::atomic::Ordering::Relaxed));
    let r = a.as_slice();
    for p in 0..4 {
        let i = p * WORDS + (last as usize % WORDS);
        assert_eq!(r[i], last);
    }
}

/// `Space::fork_prepare` (safe) without a fork: device-only data copied into the host backing,
/// the guard dropped, then the device changes the data again.
#[test]
fn a_fork_prepare_without_a_fork_leaves_the_data_coherent() {
    let (hm, dev, a) = filled_with_5();
    device_fills(&dev, &a, 7);
    drop(hm.space().fork_prepare());
    device_fills(&dev, &a, 9);
    assert_eq!(a.as_slice()[0], 9);
}

/// `Hetmm::register` is safe and takes any pointer: memory on the calling thread's own stack.
#[test]
fn registering_a_stack_array_returns() {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Arc::new(Hetmm::new().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let hm2 = Arc::clone(&hm);
    std::thread::spawn(move || {
        let x = std::hint::black_box([7u8; 3 * 4096]);
        let r = hm2.register(x.as_ptr(), x.len());
        let ok = x.iter().all(|&b| b == 7);
        let _ = tx.send((format!("{r:?}"), ok));
        std::hint::black_box(&x);
    });
    match rx.recv_timeout(Duration::from_secs(15)) {
        Ok((r, ok)) => {
            eprintln!("register: {r}");
            assert!(ok, "the stack array changed");
        }
        Err(_) => panic!("deadlock: registering a stack array never returns"),
    }
}

/// A kernel stores data it holds in a CPU slice of another buffer (a `BufRef<'static>` of a
/// leaked buffer, all safe): the simulator copies the slice under the worker's TLB lock, the
/// copy faults on the CPU (the buffer's data is on the device), and bringing it home invalidates
/// the device's TLBs, which waits for that same lock.
#[test]
fn a_kernel_storing_from_a_cpu_slice_of_device_data_returns() {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm: &'static Hetmm = Box::leak(Box::new(Hetmm::new().unwrap()));
    let dev = hm.attach_sim(SimDevice::new(cfg()).unwrap()).unwrap();
    let x: &'static mut hetmm::SharedBuf<u64> = Box::leak(Box::new(hm.alloc::<u64>(WORDS).unwrap()));
    x.as_mut_slice().fill(3);
    let x: &'static hetmm::SharedBuf<u64> = x;
    hm.migrate(x.ptr(), 4096, dev.proc()).unwrap();
    let r: hetmm::BufRef<'static, u64> = x.as_slice(); // not touched yet: the data stays on the device
    let y = hm.alloc::<u64>(WORDS).unwrap();
    let yp = y.ptr();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let res = dev
            .launch(Grid::new(1, 1), &[Use::write(&y)], move |ctx: &BlockCtx| ctx.write_slice(yp, &r[..]))
            .and_then(|l| l.wait());
        let v = res.map(|()| y.as_slice()[0]);
        let _ = tx.send(format!("{v:?}"));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(v) => assert_eq!(v, "Ok(3)"),
        Err(_) => panic!("deadlock: the kernel's store from a CPU slice never completes"),
    }
}

/// A detached device's handle must not reach the device attached after it under the same id
/// (`Device::check_same`): `make_exclusive`, `snapshot` and `check_exclusive` skip the check.
#[test]
fn a_detached_handle_does_not_reach_the_next_device() {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Hetmm::new().unwrap();
    let old = hm.attach_sim(SimDevice::new(cfg()).unwrap()).unwrap();
    hm.detach(&old).unwrap();
    let new = hm.attach_sim(SimDevice::new(cfg()).unwrap()).unwrap();
    assert_eq!(old.id(), new.id(), "ids are reused");
    let a = hm.alloc::<u64>(WORDS).unwrap();
    let r = hm.make_exclusive(a.ptr(), 4096, &old);
    let held = hm.check_exclusive(a.ptr(), 4096, &new);
    assert!(r.is_err(), "make_exclusive through a detached handle: {r:?}; the new device holds it: {held:?}");
}

/// `Hetmm::advise` sends a `DontNeed` whose end overflows to the unchecked path, trusting the
/// core to refuse it: it must, with a slice alive.
#[test]
fn an_overflowing_dont_need_is_refused() {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Hetmm::new().unwrap();
    let mut a = hm.alloc::<u64>(WORDS).unwrap();
    a.as_mut_slice().fill(5);
    let r = a.as_slice();
    for len in [u64::MAX, u64::MAX - a.ptr() + 1, u64::MAX - a.ptr() + 4096] {
        let res = hm.advise(a.ptr(), len, hetmm::Advice::DontNeed);
        assert!(res.is_err(), "len {len:#x}: {res:?}");
    }
    assert_eq!(r[0], 5);
}
