//! Mirrored (MAP_SHARED) registrations: protection, snapshots and device writes through the
//! facade.

mod common;

use std::time::Duration;

use hetmm::core::snapshot::hmm;
use hetmm::core::types::{Prot, PAGE_SIZE};
use hetmm::sim::{BlockCtx, Grid, SimConfig, SimDevice};
use hetmm::Hetmm;

const PS: usize = PAGE_SIZE as usize;
const CHILD_ENV: &str = "HETMM_MIRRORS_CHILD";

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn tmpfile(size: usize) -> i32 {
    // SAFETY: NUL-terminated literal.
    let fd = unsafe { libc::open(c"/tmp".as_ptr(), libc::O_TMPFILE | libc::O_EXCL | libc::O_RDWR, 0o600) };
    assert!(fd >= 0, "O_TMPFILE");
    // SAFETY: our fd.
    assert_eq!(unsafe { libc::ftruncate(fd, size as i64) }, 0);
    fd
}

fn mmap(size: usize, prot: i32, flags: i32, fd: i32) -> *mut u8 {
    // SAFETY: no MAP_FIXED.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), size, prot, flags, fd, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

fn sim() -> SimDevice {
    SimDevice::new(SimConfig { memory_bytes: 64 << 20, ..SimConfig::default() }).unwrap()
}

/// Runs the named test in a child process (the failure is a crash of the process, SIGSEGV),
/// returning whether it succeeded and its stderr.
fn in_child(name: &str) -> (bool, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    (out.status.success(), format!("{:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr)))
}

/// In the parent, runs the test `name` in a child (the bug was the process's death) and
/// returns false; in the child, true: the caller runs the test's body.
fn child_runs(name: &str) -> bool {
    if std::env::var_os(CHILD_ENV).is_some() {
        return true;
    }
    let (ok, err) = in_child(name);
    assert!(ok, "the child died: {err}");
    false
}

/// A kernel on `dev` writes 16 bytes of 0x5a at the start of each of `pages` pages from `addr`.
fn device_writes(
    dev: &hetmm::Device<SimDevice>,
    addr: u64,
    pages: u32,
) -> Result<(), hetmm::core::device::DeviceError> {
    let k = move |ctx: &BlockCtx| ctx.write_slice(addr + ctx.block_idx() as u64 * PAGE_SIZE, &[0x5au8; 16]);
    common::launch_raw(dev.driver(), Grid::new(pages, 1), k)?.wait(Duration::from_secs(30))
}

/// A file the program mapped MAP_SHARED read-only (the file itself opened read-write), made
/// shared with `register`, then given write access with `Hetmm::protect` (the documented way
/// to mprotect shared memory): a device write must land in the file. The manager's alias of
/// the mapping (`mapping::dup_shared`, an mremap with old size 0) keeps the read-only
/// protection the mapping had at registration, and `protect` changed only the program's view:
/// the device's write through the alias killed the process with SIGSEGV (found by an audit).
#[test]
fn device_write_to_a_mirror_made_writable_by_protect_lands_in_the_file() {
    if !child_runs("device_write_to_a_mirror_made_writable_by_protect_lands_in_the_file") {
        return;
    }
    let _g = serial();
    let hm = Hetmm::new().unwrap();
    let dev = hm.attach_sim(sim()).unwrap();
    let size = 4 * PS;
    let fd = tmpfile(size);
    let p = mmap(size, libc::PROT_READ, libc::MAP_SHARED, fd);
    hm.register(p, size).unwrap();
    hm.protect(p as u64, size as u64, Prot::READ | Prot::WRITE).unwrap();
    device_writes(&dev, p as u64, 4).unwrap();
    let mut back = vec![0u8; size];
    // SAFETY: our buffer and fd.
    assert_eq!(unsafe { libc::pread(fd, back.as_mut_ptr().cast(), size, 0) }, size as isize);
    for pg in 0..4 {
        assert_eq!(&back[pg * PS..pg * PS + 16], &[0x5a; 16], "page {pg} of the file");
    }
}

/// A snapshot of mirrored shared memory the CPU has written reports what the CPU maps (HMM's
/// SNAPSHOT reports the CPU page table: a written MAP_SHARED page is WRITE, 0x02). The core
/// never learns of the CPU's mappings of mirrored memory (it takes no CPU faults there: the
/// userfaultfd registration is write-protect mode only, nothing protected): every page stayed
/// `CpuMap::None` and the snapshot said NONE (0x00), "nothing mapped by the CPU" (found by an
/// audit). The host's page table tells now.
#[test]
fn snapshot_of_mirrored_memory_the_cpu_wrote_reports_it_mapped() {
    let _g = serial();
    let hm = Hetmm::new().unwrap();
    let dev = hm.attach_sim(sim()).unwrap();
    let size = 2 * PS;
    let fd = tmpfile(size);
    let p = mmap(size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd);
    hm.register(p, size).unwrap();
    // SAFETY: p is our RW shared mapping of `size` bytes, no Rust reference into it.
    unsafe { p.write_volatile(7) };
    let s = hm.snapshot(p as u64, size as u64, &dev).unwrap();
    let bytes: Vec<u8> = s.iter().map(|e| e.hmm_byte()).collect();
    assert_eq!(bytes[0], hmm::WRITE, "page the CPU wrote: {s:?}");
}

/// As above, with the file opened read-only: `protect` to READ | WRITE cannot succeed (the
/// kernel refuses PROT_WRITE on a shared mapping of a read-only file, EACCES) and must leave the
/// memory read-only for devices too: a device write is then refused (a protection fault), not
/// done through the read-only alias. The core's `protect_range` gave the region the new
/// protection even when the CPU side's `set_prot` failed, so the device mapped the page
/// writable and its write through the read-only alias killed the process with SIGSEGV (found
/// by an audit).
#[test]
fn a_refused_protect_of_a_read_only_file_mirror_keeps_devices_read_only() {
    if !child_runs("a_refused_protect_of_a_read_only_file_mirror_keeps_devices_read_only") {
        return;
    }
    let _g = serial();
    let hm = Hetmm::new().unwrap();
    let dev = hm.attach_sim(sim()).unwrap();
    let size = 4 * PS;
    let rw = tmpfile(size);
    // SAFETY: our buffer and fd.
    assert_eq!(unsafe { libc::pwrite(rw, [0x11u8; 4 * PS].as_ptr().cast(), size, 0) }, size as isize);
    let path = format!("/proc/self/fd/{rw}\0");
    // SAFETY: NUL-terminated path.
    let ro = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY) };
    assert!(ro >= 0);
    let p = mmap(size, libc::PROT_READ, libc::MAP_SHARED, ro);
    hm.register(p, size).unwrap();
    let r = hm.protect(p as u64, size as u64, Prot::READ | Prot::WRITE);
    eprintln!("protect of a read-only file mapping: {r:?}");
    let w = device_writes(&dev, p as u64, 4);
    eprintln!("device write: {w:?}");
    if r.is_err() {
        assert!(w.is_err(), "a device wrote a file the program cannot write");
    }
    let mut back = vec![0u8; size];
    // SAFETY: our buffer and fd.
    assert_eq!(unsafe { libc::pread(rw, back.as_mut_ptr().cast(), size, 0) }, size as isize);
    if r.is_err() {
        assert!(back.iter().all(|&b| b == 0x11), "the read-only file changed");
    }
}
