//! Linux's HMM self-tests (`tools/testing/selftests/mm/hmm-tests.c`, reference section 1),
//! ported to hetmm: one test per scenario, the private-device variant, on the simulated device.
//!
//! The dmirror driver's ioctls become the [`Dmirror`] helper below, built on the sim device and
//! the core API: READ/WRITE are device kernels that copy the range to/from a "mirror" buffer
//! (every access goes through the device page table and faults like a GPU's), MIGRATE_TO_DEV /
//! MIGRATE_TO_SYS are explicit migrations (only pages in system memory move to the device, like
//! `MIGRATE_VMA_SELECT_SYSTEM`), SNAPSHOT is `AddressSpace::snapshot` encoded as HMM bytes,
//! EXCLUSIVE/CHECK_EXCLUSIVE are `make_exclusive`/`check_exclusive`, RELEASE evicts the device,
//! FLAGS(FAIL_ALLOC) injects a one-shot 2 MiB allocation failure. Errors come back as the
//! errno the driver would return. `cpages` counts pages; `faults` is 1 when the operation took
//! device faults and 0 when everything was already mirrored (Linux counts calls of the driver's
//! fault routine, which is 1 in every single-threaded scenario).
//!
//! Memory is the program's own (`mmap`), made shared with [`Hetmm::register`]; `mprotect` is
//! [`Hetmm::protect`] (the kernel tells user space nothing about mprotect, so hetmm cannot see
//! a bare one); `munmap`, `mremap` and `madvise` are the real calls, seen through userfaultfd
//! events.
//!
//! fork (6, 7, 27, 29): the child gets a private copy of private memory as of the fork, device
//! data included, and shared memory stays shared (see `hetmm_core::fork`). The child is a real
//! `fork()` of the test process: it reports through its exit status (a panic is caught, its
//! message written straight to stderr, and the child `_exit`s with 1), and never returns into
//! the test harness or drops the parent's objects. A child that wants a device makes its own
//! `Hetmm`, as the C tests open their own `/dev/hmm_dmirror0`.
//!
//! Scenarios not ported, and why:
//! - 9 anon_write_hugetlbfs, 23 compound: hugetlbfs memory cannot be adopted into a memfd
//!   (register refuses it) and hetmm maps the CPU side with base pages only.
//! - 21 mixedmap: needs `mmap` of the dmirror device file (kernel pages inserted with
//!   vm_insert_page); hetmm has no device file.
//! - 28 hmm_gup_test: needs the kernel's gup_test debugfs interface; the user-space analogue
//!   (a kernel-mode access to device-resident memory) is covered in foundation.rs.
//!
//! The coherent variant is not run: no coherent device exists yet.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hetmm::core::device::{DeviceError, FaultCancel};
use hetmm::core::error::CoreError;
use hetmm::core::snapshot::hmm;
use hetmm::core::types::{Prot, PAGE_SIZE};
use hetmm::sim::{BlockCtx, Grid, SimConfig, SimDevice};
use hetmm::{Device, Error, Hetmm, Place, Proc};

const PS: usize = PAGE_SIZE as usize;
const BUFFER_SIZE: usize = 1024 << 12; // HMM_BUFFER_SIZE: 4 MiB
const PMD: usize = 2 << 20;
const EINVAL: i32 = libc::EINVAL;
const EFAULT: i32 = libc::EFAULT;
const EPERM: i32 = libc::EPERM;
const ENOENT: i32 = libc::ENOENT;

/// The output of one dmirror command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cmd {
    cpages: u64,
    faults: u64,
}

/// A test device with the dmirror operations.
struct Dmirror {
    dev: Device<SimDevice>,
    /// Held by the first device of a test: the scenarios run one at a time. Several of them
    /// remap and unmap fixed address ranges, and another test's threads (stacks, arenas) must
    /// not be placed there meanwhile.
    _serial: Option<std::sync::MutexGuard<'static, ()>>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn sim(mem: u64) -> SimDevice {
    SimDevice::new(SimConfig { memory_bytes: mem, ..SimConfig::default() }).unwrap()
}

fn errno_of(e: &Error, write: bool) -> i32 {
    match e {
        Error::Device(DeviceError::FaultCancelled { reason: FaultCancel::Protection, .. }) if write => EPERM,
        Error::Device(DeviceError::FaultCancelled { .. }) => EFAULT,
        Error::Core(CoreError::NotShared(_) | CoreError::Protection { .. } | CoreError::Unaligned(_)) => EINVAL,
        Error::Core(CoreError::Empty { .. } | CoreError::Overflow { .. }) => EINVAL,
        Error::Core(CoreError::NotMigratable(_)) => ENOENT,
        Error::Core(CoreError::OutOfDeviceMemory { .. }) => libc::ENOMEM,
        _ => libc::EIO,
    }
}

impl Dmirror {
    fn new(hm: &Hetmm) -> Self {
        Dmirror { dev: hm.attach_sim(sim(256 << 20)).unwrap(), _serial: None }
    }

    fn check(addr: u64, npages: usize) -> Result<(), i32> {
        if !addr.is_multiple_of(PAGE_SIZE) || npages == 0 || addr.checked_add(npages as u64 * PAGE_SIZE).is_none() {
            return Err(EINVAL);
        }
        Ok(())
    }

    fn faults_since(hm: &Hetmm, before: u64) -> u64 {
        u64::from(hm.stats().device_faults > before)
    }

    /// Waits until hetmm has applied the CPU-side events read so far, as `Device::launch` does
    /// before a kernel starts. The commands launch on the driver directly; in Linux the
    /// program's `munmap` has invalidated the device's mappings (mmu notifier) by the time it
    /// returns, but userfaultfd lets it return once hetmm's reader has *read* its event, and a
    /// kernel launched before the event is applied reads through the old mapping (under load,
    /// `anon_teardown` read the half it had just unmapped).
    fn settle(hm: &Hetmm) -> Result<(), i32> {
        hm.space().settle().map_err(|_| libc::EBUSY)
    }

    /// HMM_DMIRROR_READ: the device reads the range into `mirror`.
    fn read(&self, hm: &Hetmm, addr: u64, npages: usize, mirror: &mut [u8]) -> Result<Cmd, i32> {
        Self::check(addr, npages)?;
        Self::settle(hm)?;
        let before = hm.stats().device_faults;
        let out = Arc::new(Mutex::new(vec![0u8; npages * PS]));
        let o = Arc::clone(&out);
        let k = move |ctx: &BlockCtx| {
            let p = ctx.block_idx() as usize;
            let mut buf = vec![0u8; PS];
            ctx.read_slice(addr + (p * PS) as u64, &mut buf)?;
            o.lock().unwrap()[p * PS..(p + 1) * PS].copy_from_slice(&buf);
            Ok(())
        };
        self.run(npages, k).map_err(|e| errno_of(&e, false))?;
        mirror[..npages * PS].copy_from_slice(&out.lock().unwrap());
        Ok(Cmd { cpages: npages as u64, faults: Self::faults_since(hm, before) })
    }

    /// HMM_DMIRROR_WRITE: the device writes `mirror` into the range.
    fn write(&self, hm: &Hetmm, addr: u64, npages: usize, mirror: &[u8]) -> Result<Cmd, i32> {
        Self::check(addr, npages)?;
        Self::settle(hm)?;
        let before = hm.stats().device_faults;
        let data = Arc::new(mirror[..npages * PS].to_vec());
        let k = move |ctx: &BlockCtx| {
            let p = ctx.block_idx() as usize;
            ctx.write_slice(addr + (p * PS) as u64, &data[p * PS..(p + 1) * PS])
        };
        self.run(npages, k).map_err(|e| errno_of(&e, true))?;
        Ok(Cmd { cpages: npages as u64, faults: Self::faults_since(hm, before) })
    }

    fn run<F>(&self, npages: usize, k: F) -> Result<(), Error>
    where
        F: Fn(&BlockCtx) -> Result<(), DeviceError> + Send + Sync + 'static,
    {
        let l = common::launch_raw(self.dev.driver(), Grid::new(npages as u32, 1), k)?;
        Ok(l.wait(Duration::from_secs(60))?)
    }

    fn me(&self) -> Place {
        self.dev.proc()
    }

    /// HMM_DMIRROR_MIGRATE_TO_DEV: pages in system memory move to this device (pages on other
    /// devices stay), then the range is read back into `mirror`; ENOENT unless every page ended
    /// up here.
    fn migrate_to_dev(&self, hm: &Hetmm, addr: u64, npages: usize, mirror: &mut [u8]) -> Result<Cmd, i32> {
        Self::check(addr, npages)?;
        let len = (npages * PS) as u64;
        Self::settle(hm)?;
        hm.space().check_span(addr, len).map_err(|e| errno_of(&Error::Core(e), false))?;
        let snap = hm.snapshot(addr, len, &self.dev).map_err(|e| errno_of(&e, false))?;
        if snap.iter().any(|s| s.prot.is_empty() || s.kind == hetmm::core::snapshot::SnapKind::Error) {
            return Err(EINVAL);
        }
        // Runs of pages not on another device.
        let mut i = 0;
        while i < npages {
            if matches!(snap[i].kind, hetmm::core::snapshot::SnapKind::OtherDevice(_)) {
                i += 1;
                continue;
            }
            let s = i;
            while i < npages && !matches!(snap[i].kind, hetmm::core::snapshot::SnapKind::OtherDevice(_)) {
                i += 1;
            }
            hm.migrate(addr + (s * PS) as u64, ((i - s) * PS) as u64, self.me()).map_err(|e| errno_of(&e, false))?;
        }
        let cpages = self.on_me(hm, addr, npages);
        if cpages < npages as u64 {
            return Err(ENOENT);
        }
        self.read(hm, addr, npages, mirror)?;
        Ok(Cmd { cpages, faults: 0 })
    }

    fn on_me(&self, hm: &Hetmm, addr: u64, npages: usize) -> u64 {
        let snap = hm.snapshot(addr, (npages * PS) as u64, &self.dev).unwrap();
        snap.iter().filter(|s| s.kind == hetmm::core::snapshot::SnapKind::ThisDevice).count() as u64
    }

    /// HMM_DMIRROR_MIGRATE_TO_SYS.
    fn migrate_to_sys(&self, hm: &Hetmm, addr: u64, npages: usize) -> Result<Cmd, i32> {
        Self::check(addr, npages)?;
        let before = self.on_me(hm, addr, npages);
        hm.migrate(addr, (npages * PS) as u64, Proc::Cpu).map_err(|e| errno_of(&e, false))?;
        Ok(Cmd { cpages: before, faults: 0 })
    }

    /// HMM_DMIRROR_SNAPSHOT.
    fn snapshot(&self, hm: &Hetmm, addr: u64, npages: usize) -> Result<(Cmd, Vec<u8>), i32> {
        Self::check(addr, npages)?;
        let s = hm.snapshot(addr, (npages * PS) as u64, &self.dev).map_err(|e| errno_of(&e, false))?;
        Ok((Cmd { cpages: npages as u64, faults: 0 }, s.iter().map(|e| e.hmm_byte()).collect()))
    }

    /// HMM_DMIRROR_EXCLUSIVE: exclusive access, then the data read back into `mirror`.
    fn exclusive(&self, hm: &Hetmm, addr: u64, npages: usize, mirror: &mut [u8]) -> Result<Cmd, i32> {
        Self::check(addr, npages)?;
        hm.make_exclusive(addr, (npages * PS) as u64, &self.dev).map_err(|e| errno_of(&e, true))?;
        self.read(hm, addr, npages, mirror)
    }

    /// HMM_DMIRROR_CHECK_EXCLUSIVE: EPERM while the device still holds exclusive access.
    fn check_exclusive(&self, hm: &Hetmm, addr: u64, npages: usize) -> Result<(), i32> {
        Self::check(addr, npages)?;
        let held = hm.space().check_exclusive(addr, (npages * PS) as u64, self.dev.id()).map_err(|_| EINVAL)?;
        if held {
            Err(EPERM)
        } else {
            Ok(())
        }
    }

    /// HMM_DMIRROR_RELEASE.
    fn release(&self, hm: &Hetmm) -> Result<(), i32> {
        hm.space().evict_device(self.dev.id()).map_err(|e| errno_of(&Error::Core(e), false))
    }

    /// HMM_DMIRROR_FLAGS(FAIL_ALLOC).
    fn fail_alloc(&self, hm: &Hetmm) {
        hm.space().inject_alloc_failures(self.dev.id(), 1).unwrap();
    }
}

/// An anonymous mapping owned by the test (the program's memory).
struct Map {
    base: *mut u8,
    size: usize,
}

impl Map {
    fn anon(size: usize, prot: i32) -> Map {
        Self::mmap(size, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }
    fn mmap(size: usize, prot: i32, flags: i32, fd: i32) -> Map {
        // SAFETY: a null hint without MAP_FIXED replaces no mapping; `fd` is -1 or a file the
        // caller keeps open.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), size, prot, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        Map { base: p.cast(), size }
    }
    /// The first `align`-aligned address inside.
    fn aligned(&self, align: usize) -> *mut u8 {
        let a = (self.base as usize).next_multiple_of(align);
        a as *mut u8
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: `base..base + size` is the mapping this `Map` made and owns (holes stay PROT_NONE
        // placeholders).
        unsafe { libc::munmap(self.base.cast(), self.size) };
    }
}

fn ints(p: *mut u8, n: usize) -> &'static mut [i32] {
    // SAFETY: callers pass a 4-aligned pointer into a readable mapping of a live `Map` of theirs
    // with room for `n` ints, and use the slice only while that `Map` lives.
    unsafe { std::slice::from_raw_parts_mut(p.cast::<i32>(), n) }
}

fn mirror_ints(m: &mut [u8]) -> &mut [i32] {
    bytemuck::cast_slice_mut(m)
}

/// Unmaps `[addr, addr + len)` the way `munmap` does for hetmm (userfaultfd raises the same
/// UNMAP event), but leaves a PROT_NONE placeholder behind: tests run in parallel threads, and a
/// bare hole inside a test's own mapping could receive another thread's stack or a malloc arena,
/// which the test's later munmap of its whole range would then destroy.
fn unmap_keep_hole(addr: *mut u8, len: usize) -> i32 {
    // SAFETY: MAP_FIXED replaces only `[addr, addr + len)`, which callers take from inside a
    // mapping of their own `Map`; no Rust reference into it is live.
    let r = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if r == addr.cast() {
        0
    } else {
        -1
    }
}

fn setup() -> (Hetmm, Dmirror) {
    let guard = serial();
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let mut d = Dmirror::new(&hm);
    d._serial = Some(guard);
    (hm, d)
}

fn setup2() -> (Hetmm, Dmirror, Dmirror) {
    let guard = serial();
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let mut d0 = Dmirror::new(&hm);
    d0._serial = Some(guard);
    let d1 = Dmirror::new(&hm);
    (hm, d0, d1)
}

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
const NPAGES: usize = BUFFER_SIZE / PS;
const NINTS: usize = BUFFER_SIZE / 4;

/// 1: open_close.
#[test]
fn open_close() {
    let (hm, d) = setup();
    assert!(hm.space().device_caps(d.dev.id()).is_ok());
}

/// 2: anon_read.
#[test]
fn anon_read() {
    let (hm, d) = setup();
    let m = Map::anon(BUFFER_SIZE, RW);
    let v = ints(m.base, NINTS);
    for (i, x) in v.iter_mut().enumerate().skip(2 * PS / 4) {
        *x = i as i32;
    }
    hm.register(m.base, BUFFER_SIZE).unwrap();
    hm.protect(m.base as u64, BUFFER_SIZE as u64, Prot::READ).unwrap();
    // CPU read of page 1 (the zero page in Linux).
    // SAFETY: page 1 of `m`'s mapping, registered and readable (Prot::READ above); `m` lives to the
    // end of the test.
    assert_eq!(unsafe { std::ptr::read_volatile(m.base.add(PS).cast::<i32>()) }, 0);
    let mut mirror = vec![0u8; BUFFER_SIZE];
    let c = d.read(&hm, m.base as u64, NPAGES, &mut mirror).unwrap();
    assert_eq!(c, Cmd { cpages: NPAGES as u64, faults: 1 });
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, if i < 2 * PS / 4 { 0 } else { i as i32 }, "int {i}");
    }
}

/// 3: anon_read_prot.
#[test]
fn anon_read_prot() {
    let (hm, d) = setup();
    let m = Map::anon(BUFFER_SIZE, RW);
    for (i, x) in ints(m.base, NINTS).iter_mut().enumerate() {
        *x = i as i32;
    }
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    for (i, x) in mirror_ints(&mut mirror).iter_mut().enumerate() {
        *x = -(i as i32);
    }
    hm.protect(m.base as u64, BUFFER_SIZE as u64, Prot::empty()).unwrap();
    assert_eq!(d.read(&hm, m.base as u64, NPAGES, &mut mirror), Err(EFAULT));
    hm.protect(m.base as u64, BUFFER_SIZE as u64, Prot::READ).unwrap();
    for (i, x) in ints(m.base, NINTS).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, -(i as i32));
    }
}

/// 4: anon_write.
#[test]
fn anon_write() {
    let (hm, d) = setup();
    let m = Map::anon(BUFFER_SIZE, RW);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    for (i, x) in mirror_ints(&mut mirror).iter_mut().enumerate() {
        *x = i as i32;
    }
    let c = d.write(&hm, m.base as u64, NPAGES, &mirror).unwrap();
    assert_eq!(c, Cmd { cpages: NPAGES as u64, faults: 1 });
    for (i, x) in ints(m.base, NINTS).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
}

/// 5: anon_write_prot.
#[test]
fn anon_write_prot() {
    let (hm, d) = setup();
    let m = Map::anon(BUFFER_SIZE, libc::PROT_READ);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    let c = d.read(&hm, m.base as u64, 1, &mut mirror).unwrap();
    assert_eq!(c, Cmd { cpages: 1, faults: 1 });
    for (i, x) in mirror_ints(&mut mirror).iter_mut().enumerate() {
        *x = i as i32;
    }
    assert_eq!(d.write(&hm, m.base as u64, NPAGES, &mirror), Err(EPERM));
    assert!(ints(m.base, NINTS).iter().all(|&x| x == 0));
    hm.protect(m.base as u64, BUFFER_SIZE as u64, Prot::READ | Prot::WRITE).unwrap();
    let c = d.write(&hm, m.base as u64, NPAGES, &mirror).unwrap();
    assert_eq!(c, Cmd { cpages: NPAGES as u64, faults: 1 });
    for (i, x) in ints(m.base, NINTS).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
}

/// Runs `body` in a forked child, which exits with 0 when it returns and with 1 when it panics
/// (the message goes straight to stderr: the harness's output capture is the parent's). The
/// child never returns into the harness and drops nothing of the parent's.
fn fork_child(body: impl FnOnce()) -> libc::pid_t {
    // SAFETY: the child runs `body` and `_exit`s, never returning into the harness or dropping the
    // parent's objects; callers whose body starts threads run `settle_threads` first (see its doc).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(()) => 0,
            Err(p) => {
                let msg = p.downcast_ref::<String>().map(String::as_str).or(p.downcast_ref::<&str>().copied());
                let line = format!("fork child failed: {}\n", msg.unwrap_or("panic"));
                // SAFETY: `line` is a live String of `line.len()` bytes; fd 2 is the child's
                // stderr.
                unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
                1
            }
        };
        // SAFETY: `_exit` takes no pointers; it ends the child without running the parent's
        // destructors.
        unsafe { libc::_exit(code) };
    }
    pid
}

fn assert_exited_ok(pid: libc::pid_t) {
    let s = common::wait_status(pid);
    assert!(libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0, "child status {s:#x}");
}

/// Waits (at most 5 s) until no thread of this process has started or ended for 300 ms. Needed
/// before a fork whose child starts threads (6 and 7: the child's own `Hetmm` and device), and
/// only there: POSIX lets the child of a multithreaded process make only async-signal-safe calls,
/// and in practice a thread that is starting or ending at the moment of the fork holds
/// process-wide locks the child's new threads then wait for forever (std's registry of thread
/// stacks, for one). The C tests' children only make system calls. Earlier tests' threads end
/// lazily (hetmm's read-ahead thread within 200 ms), so the fork waits for them.
fn settle_threads() {
    let tids = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir("/proc/self/task")
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let start = std::time::Instant::now();
    let (mut last, mut since) = (tids(), std::time::Instant::now());
    while since.elapsed() < Duration::from_millis(300) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
        let now = tids();
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        }
    }
}

/// A fork child's own address space and test device (the C tests open their own dmirror).
fn child_dmirror() -> (Hetmm, Dmirror) {
    let hm = Hetmm::new().expect("hetmm in the child");
    let d = Dmirror { dev: hm.attach_sim(sim(64 << 20)).unwrap(), _serial: None };
    (hm, d)
}

/// Whether the parent's address space refuses work in a fork child.
fn parent_space_inert(hm: &Hetmm, addr: u64, len: u64) -> bool {
    matches!(hm.migrate(addr, len, Proc::Cpu), Err(Error::Core(CoreError::ForkedAway)))
        && matches!(hm.space().device_caps(hetmm::core::types::DeviceId(0)), Err(CoreError::ForkedAway))
}

/// 6: anon_write_child: the child sees the parent's data as of the fork (also where it sat on
/// the device), writes through its own device into its own copy, and the parent's memory does
/// not change.
#[test]
fn anon_write_child() {
    let (hm, d) = setup();
    for migrate in [false, true] {
        for use_thp in [false, true] {
            let size = if use_thp { PMD } else { BUFFER_SIZE };
            let npages = size / PS;
            let m = Map::anon(2 * size, RW);
            let p = if use_thp { m.aligned(size) } else { m.base };
            if use_thp {
                // SAFETY: `p..p + size` lies inside `m`'s `2 * size` mapping, which this test owns;
                // MADV_HUGEPAGE is only a hint.
                unsafe { libc::madvise(p.cast(), size, libc::MADV_HUGEPAGE) };
            }
            for (i, x) in ints(p, size / 4).iter_mut().enumerate() {
                *x = i as i32;
            }
            let mut mirror = vec![0u8; size];
            for (i, x) in mirror_ints(&mut mirror).iter_mut().enumerate() {
                *x = -(i as i32);
            }
            hm.register(p, size).unwrap();
            if migrate {
                let mut back = vec![0u8; size];
                assert_eq!(d.migrate_to_dev(&hm, p as u64, npages, &mut back).unwrap().cpages, npages as u64);
            }
            settle_threads();
            let pid = fork_child(|| {
                for (i, x) in ints(p, size / 4).iter().enumerate() {
                    assert_eq!(*x, i as i32, "child, migrate {migrate} thp {use_thp}");
                }
                let mut mine = mirror.clone();
                assert!(mirror_ints(&mut mine).iter().enumerate().all(|(i, &x)| x == -(i as i32)));
                assert!(parent_space_inert(&hm, p as u64, size as u64));
                let (chm, cd) = child_dmirror();
                chm.register(p, size).unwrap();
                let c = cd.write(&chm, p as u64, npages, &mirror).unwrap();
                assert_eq!(c, Cmd { cpages: npages as u64, faults: 1 });
                for (i, x) in ints(p, size / 4).iter().enumerate() {
                    assert_eq!(*x, -(i as i32));
                }
            });
            assert_exited_ok(pid);
            for (i, x) in ints(p, size / 4).iter().enumerate() {
                assert_eq!(*x, i as i32, "parent, migrate {migrate} thp {use_thp}");
            }
        }
    }
}

/// 7: anon_write_child_shared: shared memory stays shared: the child's device write is seen by
/// the parent (and by the parent's device).
#[test]
fn anon_write_child_shared() {
    let (hm, d) = setup();
    let m = Map::mmap(BUFFER_SIZE, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1);
    for (i, x) in ints(m.base, NINTS).iter_mut().enumerate() {
        *x = i as i32;
    }
    let mut mirror = vec![0u8; BUFFER_SIZE];
    for (i, x) in mirror_ints(&mut mirror).iter_mut().enumerate() {
        *x = -(i as i32);
    }
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let base = m.base;
    settle_threads();
    let pid = fork_child(|| {
        for (i, x) in ints(base, NINTS).iter().enumerate() {
            assert_eq!(*x, i as i32);
        }
        let (chm, cd) = child_dmirror();
        chm.register(base, BUFFER_SIZE).unwrap();
        let c = cd.write(&chm, base as u64, NPAGES, &mirror).unwrap();
        assert_eq!(c, Cmd { cpages: NPAGES as u64, faults: 1 });
        for (i, x) in ints(base, NINTS).iter().enumerate() {
            assert_eq!(*x, -(i as i32));
        }
    });
    assert_exited_ok(pid);
    for (i, x) in ints(m.base, NINTS).iter().enumerate() {
        assert_eq!(*x, -(i as i32));
    }
    let mut back = vec![0u8; BUFFER_SIZE];
    d.read(&hm, m.base as u64, NPAGES, &mut back).unwrap();
    assert_eq!(back, mirror);
}

/// 8: anon_write_huge.
#[test]
fn anon_write_huge() {
    let (hm, d) = setup();
    let m = Map::anon(2 * PMD, RW);
    let p = m.aligned(PMD);
    hm.register(p, PMD).unwrap();
    let np = PMD / PS;
    let mut mirror = vec![0u8; PMD];
    for (i, x) in mirror_ints(&mut mirror).iter_mut().enumerate() {
        *x = i as i32;
    }
    let c = d.write(&hm, p as u64, np, &mirror).unwrap();
    assert_eq!(c, Cmd { cpages: np as u64, faults: 1 });
    for (i, x) in ints(p, PMD / 4).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
}

fn tmpfile(size: usize) -> i32 {
    // SAFETY: the path is a NUL-terminated C string literal; `open` reads nothing else.
    let fd = unsafe { libc::open(c"/tmp".as_ptr(), libc::O_TMPFILE | libc::O_EXCL | libc::O_RDWR, 0o600) };
    assert!(fd >= 0, "O_TMPFILE");
    // SAFETY: `fd` is the file just opened here, owned by this function.
    assert_eq!(unsafe { libc::ftruncate(fd, size as i64) }, 0);
    fd
}

/// 10: file_read (mirrored: the device maps the file's pages).
#[test]
fn file_read() {
    let (hm, d) = setup();
    let fd = tmpfile(BUFFER_SIZE);
    let data: Vec<i32> = (0..NINTS as i32).collect();
    let bytes: &[u8] = bytemuck::cast_slice(&data);
    // SAFETY: `bytes` is a live buffer of `bytes.len()` bytes and `fd` this test's open tmpfile.
    assert_eq!(unsafe { libc::pwrite(fd, bytes.as_ptr().cast(), bytes.len(), 0) }, BUFFER_SIZE as isize);
    let m = Map::mmap(BUFFER_SIZE, libc::PROT_READ, libc::MAP_SHARED, fd);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    let c = d.read(&hm, m.base as u64, NPAGES, &mut mirror).unwrap();
    assert_eq!(c, Cmd { cpages: NPAGES as u64, faults: 1 });
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    // SAFETY: `fd` is this test's tmpfile, closed once; the mapping of it keeps its own reference.
    unsafe { libc::close(fd) };
}

/// 11: file_write: device writes land in the file.
#[test]
fn file_write() {
    let (hm, d) = setup();
    let fd = tmpfile(BUFFER_SIZE);
    let m = Map::mmap(BUFFER_SIZE, RW, libc::MAP_SHARED, fd);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    for (i, x) in mirror_ints(&mut mirror).iter_mut().enumerate() {
        *x = i as i32;
    }
    let c = d.write(&hm, m.base as u64, NPAGES, &mirror).unwrap();
    assert_eq!(c, Cmd { cpages: NPAGES as u64, faults: 1 });
    for (i, x) in ints(m.base, NINTS).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    let mut back = vec![0i32; NINTS];
    // SAFETY: `back` is a live buffer of NINTS i32s, BUFFER_SIZE bytes; `fd` is this test's open
    // tmpfile.
    assert_eq!(unsafe { libc::pread(fd, back.as_mut_ptr().cast(), BUFFER_SIZE, 0) }, BUFFER_SIZE as isize);
    for (i, x) in back.iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    // SAFETY: `fd` is this test's tmpfile, closed once; the mapping of it keeps its own reference.
    unsafe { libc::close(fd) };
}

fn init_anon(size: usize, add: i32) -> Map {
    let m = Map::anon(size, RW);
    for (i, x) in ints(m.base, size / 4).iter_mut().enumerate() {
        *x = i as i32 + add;
    }
    m
}

/// 12: migrate.
#[test]
fn migrate() {
    let (hm, d) = setup();
    let m = init_anon(BUFFER_SIZE, 0);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    let c = d.migrate_to_dev(&hm, m.base as u64, NPAGES, &mut mirror).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
}

/// 13: migrate_file_private (private file mapping: COW pages adopted like anonymous memory).
#[test]
fn migrate_file_private() {
    let (hm, d) = setup();
    let fd = tmpfile(BUFFER_SIZE);
    let m = Map::mmap(BUFFER_SIZE, RW, libc::MAP_PRIVATE, fd);
    for (i, x) in ints(m.base, NINTS).iter_mut().enumerate() {
        *x = i as i32;
    }
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    let c = d.migrate_to_dev(&hm, m.base as u64, NPAGES, &mut mirror).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    // SAFETY: `fd` is this test's tmpfile, closed once; the mapping of it keeps its own reference.
    unsafe { libc::close(fd) };
}

/// 14: migrate_fault.
#[test]
fn migrate_fault() {
    let (hm, d) = setup();
    let m = init_anon(BUFFER_SIZE, 0);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    let c = d.migrate_to_dev(&hm, m.base as u64, NPAGES, &mut mirror).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    for (i, x) in ints(m.base, NINTS / 2).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    let c = d.migrate_to_dev(&hm, m.base as u64, NPAGES, &mut mirror).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
}

/// 15: migrate_release.
#[test]
fn migrate_release() {
    let (hm, d) = setup();
    let m = init_anon(BUFFER_SIZE, 0);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    let c = d.migrate_to_dev(&hm, m.base as u64, NPAGES, &mut mirror).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    d.release(&hm).unwrap();
    assert_eq!(d.on_me(&hm, m.base as u64, NPAGES), 0);
    for (i, x) in ints(m.base, NINTS / 2).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
}

/// 16: migrate_shared: shared memory is mirrored, never migrated.
#[test]
fn migrate_shared() {
    let (hm, d) = setup();
    let m = Map::mmap(BUFFER_SIZE, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    assert_eq!(d.migrate_to_dev(&hm, m.base as u64, NPAGES, &mut mirror), Err(ENOENT));
}

/// 17: migrate_mixed (two devices).
#[test]
fn migrate_mixed() {
    let (hm, d0, d1) = setup2();
    let m = Map::anon(6 * PS, libc::PROT_NONE);
    let b = m.base as u64;
    hm.register(m.base, 6 * PS).unwrap();
    let mut mirror = vec![0u8; 6 * PS];
    assert_eq!(d1.migrate_to_dev(&hm, b, 6, &mut mirror), Err(EINVAL));
    // SAFETY: page 1 of `m`'s 6-page mapping: in bounds.
    assert_eq!(unmap_keep_hole(unsafe { m.base.add(PS) }, PS), 0);
    assert_eq!(d1.migrate_to_dev(&hm, b, 3, &mut mirror), Err(EINVAL));
    // Page 2: read-only, read by the CPU.
    hm.protect(b + 2 * PS as u64, PS as u64, Prot::READ).unwrap();
    // SAFETY: page 2 of `m`'s 6-page mapping, made readable by the protect just above.
    assert_eq!(unsafe { std::ptr::read_volatile(m.base.add(2 * PS).cast::<i32>()) }, 0);
    // Page 3: written, then read-only.
    hm.protect(b + 3 * PS as u64, PS as u64, Prot::READ | Prot::WRITE).unwrap();
    // SAFETY: page 3 of `m`'s 6-page mapping, made writable by the protect just above.
    unsafe { m.base.add(3 * PS).cast::<i32>().write_volatile(3) };
    hm.protect(b + 3 * PS as u64, PS as u64, Prot::READ).unwrap();
    // Pages 4-5: read-write, written.
    hm.protect(b + 4 * PS as u64, 2 * PS as u64, Prot::READ | Prot::WRITE).unwrap();
    // SAFETY: page 4 of `m`'s 6-page mapping, made writable by the protect just above.
    unsafe { m.base.add(4 * PS).cast::<i32>().write_volatile(3) };
    // SAFETY: page 5 of `m`'s 6-page mapping, made writable by the protect just above.
    unsafe { m.base.add(5 * PS).cast::<i32>().write_volatile(3) };
    let c = d1.migrate_to_dev(&hm, b + 2 * PS as u64, 4, &mut mirror).unwrap();
    assert_eq!(c.cpages, 4);
    assert_eq!(d0.migrate_to_dev(&hm, b + 5 * PS as u64, 1, &mut mirror), Err(ENOENT));
}

/// 18: migrate_multiple.
#[test]
fn migrate_multiple() {
    let (hm, d) = setup();
    for _ in 0..10 {
        let m = init_anon(BUFFER_SIZE, 0);
        hm.register(m.base, BUFFER_SIZE).unwrap();
        let mut mirror = vec![0u8; BUFFER_SIZE];
        let c = d.migrate_to_dev(&hm, m.base as u64, NPAGES, &mut mirror).unwrap();
        assert_eq!(c.cpages, NPAGES as u64);
        for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
            assert_eq!(*x, i as i32);
        }
        for (i, x) in ints(m.base, NINTS).iter().enumerate() {
            assert_eq!(*x, i as i32);
        }
    }
}

/// 19: anon_read_multiple.
#[test]
fn anon_read_multiple() {
    let (hm, d) = setup();
    for c in 0..10 {
        let m = init_anon(BUFFER_SIZE, c);
        hm.register(m.base, BUFFER_SIZE).unwrap();
        let mut mirror = vec![0u8; BUFFER_SIZE];
        let r = d.read(&hm, m.base as u64, NPAGES, &mut mirror).unwrap();
        assert_eq!(r, Cmd { cpages: NPAGES as u64, faults: 1 });
        for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
            assert_eq!(*x, i as i32 + c);
        }
    }
}

/// 20: anon_teardown: a device read races with munmap of the second half.
#[test]
fn anon_teardown() {
    let (hm, d) = setup();
    for c in 0..10 {
        let m = init_anon(BUFFER_SIZE, c);
        hm.register(m.base, BUFFER_SIZE).unwrap();
        let half = m.base as usize + BUFFER_SIZE / 2;
        let delay = (c as u64 * 7919) % 32_000;
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_nanos(delay));
            unmap_keep_hole(half as *mut u8, BUFFER_SIZE / 2)
        });
        let mut mirror = vec![0u8; BUFFER_SIZE];
        // The read finishes before the munmap (and sees every byte), or meets it and fails with
        // EFAULT; nothing else. (It meets it nearly every time, so the data check here seldom
        // runs: the surviving half is checked below, after the munmap, every time.)
        match d.read(&hm, m.base as u64, NPAGES, &mut mirror) {
            Ok(r) => {
                assert_eq!(r.cpages, NPAGES as u64);
                for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
                    assert_eq!(*x, i as i32 + c);
                }
            }
            Err(e) => assert_eq!(e, EFAULT, "a read racing munmap fails only as the fault on the unmapped half"),
        }
        assert_eq!(t.join().unwrap(), 0);
        // The half the program kept is intact and readable by the device; the other half is gone.
        let mut mirror = vec![0u8; BUFFER_SIZE];
        let r = d.read(&hm, m.base as u64, NPAGES / 2, &mut mirror).expect("the kept half reads");
        assert_eq!(r.cpages, (NPAGES / 2) as u64);
        for (i, x) in mirror_ints(&mut mirror)[..NINTS / 2].iter().enumerate() {
            assert_eq!(*x, i as i32 + c, "kept half, int {i}");
        }
        assert_eq!(d.read(&hm, half as u64, NPAGES / 2, &mut mirror).map(drop), Err(EFAULT), "the unmapped half");
    }
}

/// 22: snapshot (two devices).
#[test]
fn snapshot() {
    let (hm, d0, d1) = setup2();
    let m = Map::anon(7 * PS, libc::PROT_NONE);
    let b = m.base as u64;
    hm.register(m.base, 7 * PS).unwrap();
    // SAFETY: page 1 of `m`'s 7-page mapping: in bounds.
    assert_eq!(unmap_keep_hole(unsafe { m.base.add(PS) }, PS), 0);
    hm.protect(b + 2 * PS as u64, PS as u64, Prot::READ).unwrap();
    // SAFETY: page 2 of `m`'s 7-page mapping, made readable by the protect just above.
    assert_eq!(unsafe { std::ptr::read_volatile(m.base.add(2 * PS).cast::<i32>()) }, 0);
    hm.protect(b + 3 * PS as u64, PS as u64, Prot::READ | Prot::WRITE).unwrap();
    // SAFETY: page 3 of `m`'s 7-page mapping, made writable by the protect just above.
    unsafe { m.base.add(3 * PS).cast::<i32>().write_volatile(3) };
    hm.protect(b + 3 * PS as u64, PS as u64, Prot::READ).unwrap();
    hm.protect(b + 4 * PS as u64, 3 * PS as u64, Prot::READ | Prot::WRITE).unwrap();
    // SAFETY: page 4 of `m`'s 7-page mapping, made writable by the protect just above.
    unsafe { m.base.add(4 * PS).cast::<i32>().write_volatile(3) };
    let mut mirror = vec![0u8; PS];
    assert_eq!(d0.migrate_to_dev(&hm, b + 5 * PS as u64, 1, &mut mirror).unwrap().cpages, 1);
    assert_eq!(d1.migrate_to_dev(&hm, b + 6 * PS as u64, 1, &mut mirror).unwrap().cpages, 1);
    let (c, m8) = d0.snapshot(&hm, b, 7).unwrap();
    assert_eq!(c.cpages, 7);
    assert_eq!(
        m8,
        vec![
            hmm::ERROR,
            hmm::ERROR,
            hmm::ZERO | hmm::READ,
            hmm::READ,
            hmm::WRITE,
            hmm::DEV_PRIVATE_LOCAL | hmm::WRITE,
            hmm::NONE
        ]
    );
}

/// 24: double_map (two devices).
#[test]
fn double_map() {
    let (hm, d0, d1) = setup2();
    let m = init_anon(6 * PS, 0);
    hm.register(m.base, 6 * PS).unwrap();
    hm.protect(m.base as u64, 6 * PS as u64, Prot::READ).unwrap();
    let b = m.base as u64;
    let check = |mirror: &mut [u8]| {
        for (i, x) in mirror_ints(mirror).iter().enumerate() {
            assert_eq!(*x, i as i32);
        }
    };
    let mut mirror = vec![0u8; 6 * PS];
    assert_eq!(d0.read(&hm, b, 6, &mut mirror).unwrap(), Cmd { cpages: 6, faults: 1 });
    check(&mut mirror);
    let mut mirror = vec![0u8; 6 * PS];
    assert_eq!(d1.read(&hm, b, 6, &mut mirror).unwrap(), Cmd { cpages: 6, faults: 1 });
    check(&mut mirror);
    let mut mirror = vec![0u8; 6 * PS];
    assert_eq!(d1.migrate_to_dev(&hm, b, 6, &mut mirror).unwrap().cpages, 6);
    check(&mut mirror);
    let mut mirror = vec![0u8; 6 * PS];
    assert_eq!(d0.read(&hm, b, 6, &mut mirror).unwrap(), Cmd { cpages: 6, faults: 1 });
    check(&mut mirror);
}

/// 25: exclusive.
#[test]
fn exclusive() {
    let (hm, d) = setup();
    let m = init_anon(BUFFER_SIZE, 0);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    let c = d.exclusive(&hm, m.base as u64, NPAGES, &mut mirror).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    assert_eq!(d.check_exclusive(&hm, m.base as u64, NPAGES), Err(EPERM), "held until the CPU touches it");
    let v = ints(m.base, NINTS);
    for (i, x) in v.iter_mut().enumerate() {
        assert_eq!(*x, i as i32);
        *x += 1;
    }
    for (i, x) in v.iter().enumerate() {
        assert_eq!(*x, i as i32 + 1);
    }
    assert_eq!(d.check_exclusive(&hm, m.base as u64, NPAGES), Ok(()));
}

/// 26: exclusive_mprotect.
#[test]
fn exclusive_mprotect() {
    let (hm, d) = setup();
    let m = init_anon(BUFFER_SIZE, 0);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    assert_eq!(d.exclusive(&hm, m.base as u64, NPAGES, &mut mirror).unwrap().cpages, NPAGES as u64);
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    hm.protect(m.base as u64, BUFFER_SIZE as u64, Prot::READ).unwrap();
    assert_eq!(d.write(&hm, m.base as u64, NPAGES, &mirror), Err(EPERM));
}

/// 27: exclusive_cow: after a fork of memory the device holds exclusively, parent and child
/// each increment their own copy.
#[test]
fn exclusive_cow() {
    let (hm, d) = setup();
    let m = init_anon(BUFFER_SIZE, 0);
    hm.register(m.base, BUFFER_SIZE).unwrap();
    let mut mirror = vec![0u8; BUFFER_SIZE];
    assert_eq!(d.exclusive(&hm, m.base as u64, NPAGES, &mut mirror).unwrap().cpages, NPAGES as u64);
    let base = m.base;
    let bump = || {
        let v = ints(base, NINTS);
        for (i, x) in v.iter_mut().enumerate() {
            assert_eq!(*x, i as i32);
            *x += 1;
        }
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, i as i32 + 1);
        }
    };
    let pid = fork_child(bump);
    bump();
    assert_exited_ok(pid);
}

/// 29: hmm_cow_in_device: the parent writes device-resident pages while a child lives (the
/// write faults them home first); the snapshot shows CPU-writable pages.
#[test]
fn hmm_cow_in_device() {
    let (hm, d) = setup();
    let np = 4;
    let m = init_anon(np * PS, 0);
    hm.register(m.base, np * PS).unwrap();
    let mut mirror = vec![0u8; np * PS];
    assert_eq!(d.migrate_to_dev(&hm, m.base as u64, np, &mut mirror).unwrap().cpages, np as u64);
    let pid = fork_child(|| loop {
        // SAFETY: `pause` takes no arguments and is async-signal-safe; the child waits in it for
        // SIGKILL.
        unsafe { libc::pause() };
    });
    for (i, x) in ints(m.base, np * PS / 4).iter_mut().enumerate() {
        *x = i as i32;
    }
    // SAFETY: `pid` is our own fork child, not yet reaped (wait_status below), so it names no other
    // process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = common::wait_status(pid);
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL, "status {status:#x}");
    let (c, m8) = d.snapshot(&hm, m.base as u64, np).unwrap();
    assert_eq!(c.cpages, np as u64);
    assert!(m8.iter().all(|&b| b == hmm::WRITE), "{m8:x?}");
}

/// A PMD-aligned PMD-sized buffer inside a `2 * PMD` mapping, registered.
fn huge(hm: &Hetmm, prot: i32, init: bool) -> (Map, *mut u8) {
    let m = Map::anon(2 * PMD, prot);
    let p = m.aligned(PMD);
    // SAFETY: `p..p + PMD` lies inside `m`'s `2 * PMD` mapping, owned here; MADV_HUGEPAGE is only a
    // hint.
    unsafe { libc::madvise(p.cast(), PMD, libc::MADV_HUGEPAGE) };
    if init {
        for (i, x) in ints(p, PMD / 4).iter_mut().enumerate() {
            *x = i as i32;
        }
    }
    hm.register(p, PMD).unwrap();
    (m, p)
}

/// 30: migrate_anon_huge_empty.
#[test]
fn migrate_anon_huge_empty() {
    let (hm, d) = setup();
    let (_m, p) = huge(&hm, libc::PROT_READ, false);
    let mut mirror = vec![0xFFu8; PMD];
    let c = d.migrate_to_dev(&hm, p as u64, PMD / PS, &mut mirror).unwrap();
    assert_eq!(c.cpages, (PMD / PS) as u64);
    assert!(mirror.iter().all(|&b| b == 0));
}

/// 31: migrate_anon_huge_zero.
#[test]
fn migrate_anon_huge_zero() {
    let (hm, d) = setup();
    let (_m, p) = huge(&hm, libc::PROT_READ, false);
    // SAFETY: `p` is the 4-aligned start of the PMD buffer inside `_m`, mapped readable and alive
    // here.
    assert_eq!(unsafe { std::ptr::read_volatile(p.cast::<i32>()) }, 0);
    let mut mirror = vec![0xFFu8; PMD];
    let c = d.migrate_to_dev(&hm, p as u64, PMD / PS, &mut mirror).unwrap();
    assert_eq!(c.cpages, (PMD / PS) as u64);
    assert!(mirror.iter().all(|&b| b == 0));
    assert!(ints(p, PMD / 4).iter().all(|&x| x == 0));
}

/// 32: migrate_anon_huge_free. hetmm memory is a shared memfd view, where Linux refuses
/// MADV_FREE (private anonymous only) with EINVAL; either answer must leave the data intact
/// (MADV_FREE may or may not free, and nothing was freed here).
#[test]
fn migrate_anon_huge_free() {
    let (hm, d) = setup();
    let (_m, p) = huge(&hm, RW, true);
    let mut mirror = vec![0u8; PMD];
    let c = d.migrate_to_dev(&hm, p as u64, PMD / PS, &mut mirror).unwrap();
    assert_eq!(c.cpages, (PMD / PS) as u64);
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    // SAFETY: `p..p + PMD` lies inside `_m`, owned here, and no Rust reference into it is live.
    let r = unsafe { libc::madvise(p.cast(), PMD, libc::MADV_FREE) };
    assert!(r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(EINVAL));
    for (i, x) in ints(p, PMD / 4).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
}

/// 33: migrate_anon_huge_fault. The pagemap check (PM_SWAP entries) has no analogue: hetmm's
/// CPU view of device-resident pages is simply unmapped (a userfaultfd MINOR fault).
#[test]
fn migrate_anon_huge_fault() {
    let (hm, d) = setup();
    let (_m, p) = huge(&hm, RW, true);
    let mut mirror = vec![0u8; PMD];
    let c = d.migrate_to_dev(&hm, p as u64, PMD / PS, &mut mirror).unwrap();
    assert_eq!(c.cpages, (PMD / PS) as u64);
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    let (_, m8) = d.snapshot(&hm, p as u64, PMD / PS).unwrap();
    assert!(m8.iter().all(|&b| b == hmm::DEV_PRIVATE_LOCAL | hmm::WRITE | hmm::PMD), "{:#x}", m8[0]);
    for (i, x) in ints(p, PMD / 4).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
}

/// 34: migrate_partial_unmap_fault.
#[test]
fn migrate_partial_unmap_fault() {
    for use_thp in [false, true] {
        for offset in [0, PMD / 4, PMD / 2] {
            let (hm, d) = setup();
            let m = Map::anon(4 * PMD, RW);
            let p = m.aligned(PMD);
            let advice = if use_thp { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
            // SAFETY: `p..p + PMD` lies inside `m`'s `4 * PMD` mapping, owned here; the advice is
            // only a hint.
            unsafe { libc::madvise(p.cast(), PMD, advice) };
            for (i, x) in ints(p, PMD / 4).iter_mut().enumerate() {
                *x = i as i32;
            }
            hm.register(p, PMD).unwrap();
            let mut mirror = vec![0u8; PMD];
            let c = d.migrate_to_dev(&hm, p as u64, PMD / PS, &mut mirror).unwrap();
            assert_eq!(c.cpages, (PMD / PS) as u64);
            for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
                assert_eq!(*x, i as i32);
            }
            // SAFETY: `offset <= PMD / 2`, so `PMD / 2` bytes from `p + offset` stay inside the PMD
            // buffer at `p`.
            assert_eq!(unmap_keep_hole(unsafe { p.add(offset) }, PMD / 2), 0);
            let v = ints(p, PMD / 4);
            for (i, x) in v.iter().enumerate() {
                let b = i * 4;
                if b >= offset && b < offset + PMD / 2 {
                    continue;
                }
                assert_eq!(*x, i as i32, "thp {use_thp} offset {offset:#x} int {i}");
            }
        }
    }
}

/// 35: migrate_remap_fault: mremap (with and without MREMAP_DONTUNMAP) before or after the
/// migration; the data follows to the new address.
#[test]
fn migrate_remap_fault() {
    for before in [false, true] {
        for dont_unmap in [false, true] {
            for use_thp in [false, true] {
                for offset in [0, PMD / 2, PMD] {
                    let (hm, d) = setup();
                    let m = Map::anon(9 * PMD, RW);
                    let map = m.aligned(PMD);
                    let advice = if use_thp { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
                    // SAFETY: `map..map + PMD` lies inside `m`'s `9 * PMD` mapping, owned here;
                    // advice is a hint.
                    unsafe { libc::madvise(map.cast(), PMD, advice) };
                    // The hole the remap lands in stays reserved (PROT_NONE) rather than unmapped:
                    // otherwise malloc or a new thread's stack may be placed in it, and the
                    // MAP_FIXED remap would silently replace them.
                    // SAFETY: MAP_FIXED replaces `[map + PMD, map + 3 * PMD)`, inside `m`'s `9 *
                    // PMD` mapping, used only here.
                    let hole = unsafe {
                        libc::mmap(
                            map.add(PMD).cast(),
                            2 * PMD,
                            libc::PROT_NONE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                            -1,
                            0,
                        )
                    };
                    // SAFETY: `map + PMD` lies inside `m`'s `9 * PMD` mapping.
                    assert_eq!(hole, unsafe { map.add(PMD) }.cast());
                    for (i, x) in ints(map, PMD / 4).iter_mut().enumerate() {
                        *x = i as i32;
                    }
                    hm.register(map, PMD).unwrap();
                    // SAFETY: `offset <= PMD`, so `target..target + PMD` lies inside the hole
                    // reserved above, in `m`.
                    let target = unsafe { map.add(PMD + offset) };
                    let mut flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
                    if dont_unmap {
                        flags |= libc::MREMAP_DONTUNMAP;
                    }
                    let np = PMD / PS;
                    let mut mirror = vec![0u8; PMD];
                    let mut ptr = map;
                    if before {
                        // SAFETY: moves `map`'s PMD buffer into the hole reserved above, both in
                        // `m`; no Rust reference into either lives.
                        let r = unsafe { libc::mremap(map.cast(), PMD, PMD, flags, target) };
                        assert_ne!(r, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
                        ptr = r.cast();
                        if !dont_unmap {
                            unmap_keep_hole(map, PMD);
                        }
                    }
                    let c = d.migrate_to_dev(&hm, ptr as u64, np, &mut mirror).unwrap();
                    assert_eq!(c.cpages, np as u64);
                    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
                        assert_eq!(*x, i as i32);
                    }
                    if !before {
                        // SAFETY: moves `map`'s PMD buffer into the hole reserved above, both in
                        // `m`; no Rust reference into either lives.
                        let r = unsafe { libc::mremap(map.cast(), PMD, PMD, flags, target) };
                        assert_ne!(r, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
                        ptr = r.cast();
                        if !dont_unmap {
                            unmap_keep_hole(map, PMD);
                        }
                    }
                    for (i, x) in ints(ptr, PMD / 4).iter().enumerate() {
                        assert_eq!(*x, i as i32, "before {before} dontunmap {dont_unmap} thp {use_thp} off {offset}");
                    }
                    unmap_keep_hole(ptr, PMD);
                }
            }
        }
    }
}

/// 36: migrate_anon_huge_err: a failed 2 MiB device allocation falls back to base pages.
#[test]
fn migrate_anon_huge_err() {
    let (hm, d) = setup();
    let (_m, p) = huge(&hm, RW, true);
    let np = PMD / PS;
    let mut mirror = vec![0xFFu8; PMD];
    d.fail_alloc(&hm);
    let c = d.migrate_to_dev(&hm, p as u64, np, &mut mirror).unwrap();
    assert_eq!(c.cpages, np as u64);
    for (i, x) in mirror_ints(&mut mirror).iter().enumerate() {
        assert_eq!(*x, i as i32);
    }
    // The level is not asserted: the 512 base pages of the fallback may still come out of the
    // buddy allocator contiguous and aligned, and then the device maps them with one 2 MiB entry.
    let (_, m8) = d.snapshot(&hm, p as u64, np).unwrap();
    assert!(m8.iter().all(|&b| b & !hmm::PMD == hmm::DEV_PRIVATE_LOCAL | hmm::WRITE));
    assert_eq!(ints(p, PMD / 4)[2048], 2048);
    // A fresh buffer migrates as one 2 MiB chunk; then a failing allocation does not disturb
    // the way back.
    let (_m2, p2) = huge(&hm, RW, true);
    assert_eq!(d.migrate_to_dev(&hm, p2 as u64, np, &mut mirror).unwrap().cpages, np as u64);
    d.fail_alloc(&hm);
    assert_eq!(d.migrate_to_sys(&hm, p2 as u64, np).unwrap().cpages, np as u64);
    assert_eq!(ints(p2, PMD / 4)[2048], 2048);
}

/// 37: migrate_anon_huge_zero_err.
#[test]
fn migrate_anon_huge_zero_err() {
    let (hm, d) = setup();
    let (_m, p) = huge(&hm, libc::PROT_READ, false);
    let np = PMD / PS;
    let mut mirror = vec![0xFFu8; PMD];
    d.fail_alloc(&hm);
    let c = d.migrate_to_dev(&hm, p as u64, np, &mut mirror).unwrap();
    assert_eq!(c.cpages, np as u64);
    assert!(mirror.iter().all(|&b| b == 0));
    assert_eq!(ints(p, PMD / 4)[2048], 0);
    let (_m2, p2) = huge(&hm, libc::PROT_READ, false);
    assert_eq!(ints(p2, PMD / 4)[0], 0);
    d.fail_alloc(&hm);
    let mut mirror = vec![0xFFu8; PMD];
    assert_eq!(d.migrate_to_dev(&hm, p2 as u64, np, &mut mirror).unwrap().cpages, np as u64);
    assert!(mirror.iter().all(|&b| b == 0));
    assert!(ints(p2, PMD / 4).iter().all(|&x| x == 0));
}

/// 38: benchmark_thp_migration: every migration succeeds for each size, with and without
/// MADV_HUGEPAGE (sizes up to 8 PMD; 128 PMD is left out to keep CI time sane). Prints the
/// table.
#[test]
fn benchmark_thp_migration() {
    let (hm, d) = setup();
    for mult in [PMD / 4, PMD / 2, PMD, 2 * PMD, 4 * PMD, 8 * PMD] {
        for thp in [false, true] {
            let m = Map::anon(mult + PMD, RW);
            let p = m.aligned(PMD);
            let advice = if thp { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
            // SAFETY: `p..p + mult` lies inside `m`'s `mult + PMD` mapping, owned here; the advice
            // is only a hint.
            unsafe { libc::madvise(p.cast(), mult, advice) };
            // SAFETY: `p..p + mult` is inside `m`'s read-write mapping, which outlives `bytes`;
            // meanwhile only hetmm's migrations touch it, and they keep every byte.
            let bytes = unsafe { std::slice::from_raw_parts_mut(p, mult) };
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (i & 0xFF) as u8;
            }
            hm.register(p, mult).unwrap();
            let np = mult / PS;
            let mut mirror = vec![0u8; mult];
            let t = std::time::Instant::now();
            for _ in 0..6 {
                d.migrate_to_dev(&hm, p as u64, np, &mut mirror).unwrap();
                d.migrate_to_sys(&hm, p as u64, np).unwrap();
            }
            eprintln!("size {:>6} KiB thp {thp}: {:?} per round trip", mult >> 10, t.elapsed() / 6);
            assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i & 0xFF) as u8));
            hm.unregister(p, mult).unwrap();
        }
    }
}

/// The permissions column of `/proc/self/maps` for the mapping holding `addr`.
fn maps_perms(addr: u64) -> String {
    common::maps_meeting(addr, addr + 1).pop().unwrap_or_else(|| panic!("{addr:#x} is not mapped")).perms
}

/// Not an HMM scenario: the guarantee behind 6 and 29 at its sharpest. Data a device *wrote*
/// (its only copy in device memory, the host copy stale) reaches the child; never-written pages
/// read zero; the child's copy is ordinary private memory; the parent's pages keep their state
/// and its device keeps working. On `Hetmm::alloc` memory, two whole blocks and a partial one.
#[test]
fn fork_child_sees_device_written_data() {
    let (hm, d) = setup();
    let n = 2 * PMD + 3 * PS;
    let mut buf = hm.alloc::<i32>(n / 4).unwrap();
    let base = buf.ptr();
    // The CPU writes i up to `written`; the rest is never touched.
    let written = PMD + 9 * PS;
    for (i, x) in buf.as_mut_slice()[..written / 4].iter_mut().enumerate() {
        *x = i as i32;
    }
    // The device writes -i over the first block and two pages of the second; three more pages
    // are only migrated.
    let dev_pages = PMD / PS + 2;
    let mut mirror = vec![0u8; dev_pages * PS];
    for (i, x) in mirror_ints(&mut mirror).iter_mut().enumerate() {
        *x = -(i as i32);
    }
    assert_eq!(d.write(&hm, base, dev_pages, &mirror).unwrap().cpages, dev_pages as u64);
    hm.migrate(base + (dev_pages * PS) as u64, 3 * PS as u64, d.me()).unwrap();
    let expect = |i: usize| -> i32 {
        if i * 4 < dev_pages * PS {
            -(i as i32)
        } else if i * 4 < written {
            i as i32
        } else {
            0
        }
    };
    let (_, before) = d.snapshot(&hm, base, n / PS).unwrap();
    assert!(before[..dev_pages + 3].iter().all(|&b| b & hmm::DEV_PRIVATE_LOCAL != 0), "{before:x?}");
    let stats = hm.stats();
    let ptr = base as *mut u8;
    let pid = fork_child(|| {
        let v = ints(ptr, n / 4);
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, expect(i), "child, int {i}");
        }
        // Ordinary private memory, the child's own.
        assert_eq!(maps_perms(base), "rw-p");
        assert_eq!(maps_perms(base + (n - PS) as u64), "rw-p");
        v.fill(7);
        assert!(parent_space_inert(&hm, base, PS as u64));
    });
    assert_exited_ok(pid);
    let st = hm.stats().since(&stats);
    assert_eq!(st.forks, 1);
    assert!(st.bytes_fork_flushed >= (dev_pages * PS) as u64, "{}", st.bytes_fork_flushed);
    // Nothing moved in the parent, and its device still has what it wrote.
    let (_, after) = d.snapshot(&hm, base, n / PS).unwrap();
    assert_eq!(before, after);
    let mut back = vec![0u8; dev_pages * PS];
    d.read(&hm, base, dev_pages, &mut back).unwrap();
    assert_eq!(back, mirror);
    for (i, x) in buf.as_slice().iter().enumerate() {
        assert_eq!(*x, expect(i), "parent, int {i}");
    }
    // The device keeps working after the fork: a new write, seen by the CPU.
    for x in mirror_ints(&mut mirror).iter_mut() {
        *x = 3;
    }
    d.write(&hm, base, dev_pages, &mirror).unwrap();
    assert!(buf.as_slice()[..dev_pages * PS / 4].iter().all(|&x| x == 3));
}

/// Not an HMM scenario: registered memory split by `protect` keeps each part's protection in
/// the child, device-written data included; the read-only part stays read-only.
#[test]
fn fork_child_keeps_registered_layout() {
    let (hm, d) = setup();
    let np = 8;
    let m = init_anon(np * PS, 0);
    let b = m.base as u64;
    hm.register(m.base, np * PS).unwrap();
    hm.protect(b + 2 * PS as u64, PS as u64, Prot::READ).unwrap();
    let mut mirror = vec![0u8; 4 * PS];
    for (i, x) in mirror_ints(&mut mirror).iter_mut().enumerate() {
        *x = 1000 + i as i32;
    }
    d.write(&hm, b + 4 * PS as u64, 4, &mirror).unwrap();
    let expect = |i: usize| if i * 4 < 4 * PS { i as i32 } else { 1000 + (i - PS) as i32 };
    let base = m.base;
    let pid = fork_child(|| {
        for (i, x) in ints(base, np * PS / 4).iter().enumerate() {
            assert_eq!(*x, expect(i), "child, int {i}");
        }
        assert_eq!(maps_perms(b), "rw-p");
        assert_eq!(maps_perms(b + 2 * PS as u64), "r--p");
        assert_eq!(maps_perms(b + 5 * PS as u64), "rw-p");
        ints(base, np * PS / 4)[4 * PS / 4] = -1;
    });
    assert_exited_ok(pid);
    for (i, x) in ints(m.base, np * PS / 4).iter().enumerate() {
        assert_eq!(*x, expect(i), "parent, int {i}");
    }
}

/// Not an HMM scenario: the child's copy is as of the fork. `fork()` returns in the parent only
/// once the child has its copy, so the parent's writes right after it (racing the child's copy
/// of 64 MiB otherwise) never reach the child.
#[test]
fn fork_copy_is_taken_before_fork_returns() {
    let (hm, _d) = setup();
    let n = 64 << 20;
    let mut buf = hm.alloc::<u32>(n / 4).unwrap();
    buf.as_mut_slice().fill(1);
    let ptr = buf.ptr() as *mut u8;
    let t = std::time::Instant::now();
    let pid = fork_child(|| {
        let v = ints(ptr, n / 4);
        assert!(v.iter().all(|&x| x == 1), "the child saw a write made after fork returned");
    });
    eprintln!("fork with 64 MiB of private hetmm memory: {:?}", t.elapsed());
    buf.as_mut_slice().fill(2);
    assert_exited_ok(pid);
    assert!(buf.as_slice().iter().all(|&x| x == 2));
}

/// Not an HMM scenario: forks while other threads keep a device and the CPU busy on another
/// buffer (device faults, migrations both ways, CPU faults). No fork hangs, every child sees
/// the device-written data of the quiet buffer, and the busy threads' data stays right.
#[test]
fn fork_under_device_and_cpu_traffic() {
    let (hm, d) = setup();
    let np = 64;
    let quiet = hm.alloc::<i32>(np * PS / 4).unwrap();
    let busy = hm.alloc::<i32>(np * PS / 4).unwrap();
    let mut mirror = vec![0u8; np * PS];
    for (i, x) in mirror_ints(&mut mirror).iter_mut().enumerate() {
        *x = 5 * i as i32;
    }
    d.write(&hm, quiet.ptr(), np, &mirror).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let done = std::sync::atomic::AtomicI32::new(0);
    let qptr = quiet.ptr() as *mut u8;
    let rounds = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let mut round = 0i32;
            let mut data = vec![0u8; np * PS];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                round += 1;
                for x in mirror_ints(&mut data).iter_mut() {
                    *x = round;
                }
                d.write(&hm, busy.ptr(), np, &data).unwrap();
                assert!(busy.as_slice().iter().all(|&x| x == round), "round {round}");
                done.store(round, std::sync::atomic::Ordering::Relaxed);
            }
            round
        });
        for k in 0..10 {
            // Each fork lands while the worker is mid-way through its rounds.
            let t = std::time::Instant::now();
            while done.load(std::sync::atomic::Ordering::Relaxed) <= k && t.elapsed() < Duration::from_secs(20) {
                std::thread::yield_now();
            }
            let pid = fork_child(|| {
                for (i, x) in ints(qptr, np * PS / 4).iter().enumerate() {
                    assert_eq!(*x, 5 * i as i32, "fork {k}, int {i}");
                }
            });
            assert_exited_ok(pid);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        worker.join().unwrap()
    });
    assert!(rounds > 10, "{rounds}");
    assert!(quiet.as_slice().iter().enumerate().all(|(i, &x)| x == 5 * i as i32));
}
