//! `fork()` racing the program's own changes to registered memory: another thread unmaps or
//! moves it while the fork is being prepared (the prepare handler flushing device-only data).
//! Each child says whether the other thread had finished before the fork (a flag in memory it
//! inherits); only those children count, and each must see the layout the program had then.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use hetmm::sim::{SimConfig, SimDevice};
use hetmm::{Hetmm, Proc};

const PS: usize = 4096;
const LEN: usize = 16 * PS;
/// Device-only data the prepare handler flushes: long enough a window for the other thread.
const BIG: usize = 256 << 20;
const OLD: u8 = 0xAA;
const NEW: u8 = 0x55;

/// Set by each test's other thread once its change is done (read by the child: set there means
/// the change was made before the fork). One per test.
static UNMAPPED: AtomicBool = AtomicBool::new(false);
static MOVED: AtomicBool = AtomicBool::new(false);

/// Every fork prepares every address space of the process: the tests take turns, so that each
/// one's counts of forks and windows are its own.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn setup() -> (Hetmm, hetmm::Device<SimDevice>, hetmm::SharedBuf<u8>) {
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let cfg = SimConfig { memory_bytes: 2 * BIG as u64, ..SimConfig::default() };
    let dev = hm.attach_sim(SimDevice::new(cfg).unwrap()).unwrap();
    let mut big = hm.alloc::<u8>(BIG).unwrap();
    big.as_mut_slice().fill(3);
    hm.migrate(big.ptr(), BIG as u64, dev.proc()).unwrap();
    (hm, dev, big)
}

/// `len` bytes of private anonymous memory filled with `byte`.
fn anon(len: usize, byte: u8) -> *mut u8 {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a new anonymous mapping where the kernel chooses replaces no existing mapping.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `p` is the `len`-byte read-write mapping just made, which only this thread uses yet.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), byte, len) };
    p.cast()
}

/// Private anonymous memory filled with `byte`, registered with `hm`.
fn registered(hm: &Hetmm, byte: u8) -> *mut u8 {
    let p = anon(LEN, byte);
    hm.register(p, LEN).unwrap();
    p
}

/// Waits (at most 10 s) until `hm` has begun preparing a fork after `before` forks.
fn wait_for_fork(hm: &Hetmm, before: u64) {
    let t = Instant::now();
    while hm.stats().forks == before && t.elapsed() < Duration::from_secs(10) {
        std::hint::spin_loop();
    }
}

/// Forks; the child exits with `check()`'s code (allocation-free). Returns the wait status.
fn fork_with(check: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs only `check` (reading inherited memory, allocating nothing) and
    // `_exit`s, never returning into the test.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = check();
        // SAFETY: `_exit` has no preconditions; it ends the child without running the parent's exit
        // handlers.
        unsafe { libc::_exit(code) };
    }
    common::wait_status(pid)
}

/// Forks while another thread makes `change` as soon as `hm` begins preparing the fork. The
/// child exits with `check()`'s code (allocation-free), or [`TOO_LATE`] if the change had not
/// finished before the fork (`done`, which this resets, tells it). Returns the wait status.
fn fork_during(
    hm: &Hetmm,
    done: &'static AtomicBool,
    change: impl FnOnce() + Send,
    check: impl FnOnce() -> i32,
) -> i32 {
    done.store(false, Ordering::SeqCst);
    let before = hm.stats().forks;
    std::thread::scope(|s| {
        s.spawn(move || {
            wait_for_fork(hm, before);
            change();
            done.store(true, Ordering::SeqCst);
        });
        fork_with(|| if done.load(Ordering::SeqCst) { check() } else { TOO_LATE })
    })
}

/// Child exit codes.
const FINE: i32 = 0;
const WRONG: i32 = 3;
const TOO_LATE: i32 = 4;
/// The child's copy of hetmm memory failed (`ForkGuard::child` returned an error).
const COPY_FAILED: i32 = 5;
/// The child could not have all of hetmm's memory (`last_child_lost_bytes` is not 0).
const LOST: i32 = 6;

fn code(status: i32) -> i32 {
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    libc::WEXITSTATUS(status)
}

/// A fork whose window is held open: the fork is prepared (as the `pthread_atfork` prepare
/// handler does), then `change` runs, then the process forks with the raw system call (no fork
/// handler runs) and the child makes its copy as the child handler does
/// (`ForkGuard::child`) before it exits with `check()`'s code (allocation-free). The parent
/// waits for the child before it lets the prepared fork go. So `change` always falls after the
/// prepare's snapshot of the address space and before the fork: the window that a program's
/// `munmap` or `mremap` on another thread hits by chance. Returns the wait status.
fn fork_after_prepare(hm: &Hetmm, change: impl FnOnce(), check: impl FnOnce() -> i32) -> i32 {
    let guard = hm.space().fork_prepare().expect("this process's own address space");
    change();
    // A raw fork (clone with SIGCHLD only, no new stack): the child is a copy of this thread
    // alone; it runs only `ForkGuard::child` (system calls, as in the atfork child handler) and
    // `check` (reads and writes of inherited memory, no allocation), then `_exit`s.
    // SAFETY: the child never returns into the test and makes no call unsafe after a fork.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) } as libc::pid_t;
    if pid == 0 {
        let code = match guard.child() {
            Ok(()) => check(),
            Err(_) => COPY_FAILED,
        };
        // SAFETY: `_exit` has no preconditions; it ends the child without running the parent's exit
        // handlers.
        unsafe { libc::_exit(code) };
    }
    let status = if pid > 0 { Some(common::wait_status(pid)) } else { None };
    guard.parent();
    status.unwrap_or_else(|| panic!("clone: {}", std::io::Error::last_os_error()))
}

/// A fresh PROT_NONE placeholder of `len` bytes (where memory is moved to).
fn placeholder(len: usize) -> usize {
    // SAFETY: a new PROT_NONE placeholder where the kernel chooses replaces no existing mapping.
    let to = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(to, libc::MAP_FAILED);
    to as usize
}

/// Whether the `len` bytes at `addr` all hold `byte` (allocation-free).
///
/// # Safety
///
/// `addr..addr + len` must be readable memory that no one writes meanwhile.
unsafe fn all_are(addr: usize, len: usize, byte: u8) -> bool {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.iter().all(|&b| b == byte)
}

/// Forks after the prepare and `change` ([`fork_after_prepare`]); the child must find the
/// registered bytes `OLD` at `at..at + len` and its writes there must not reach the parent.
fn child_copy_is_private(hm: &Hetmm, change: impl FnOnce(), at: usize, len: usize, what: &str) {
    let status = fork_after_prepare(hm, change, || {
        // SAFETY: in the child: `at..at + len` is mapped read-write (the caller's memory, where
        // `change` left it), and the child has no other thread.
        if !unsafe { all_are(at, len, OLD) } {
            return WRONG;
        }
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(at as *mut u8, NEW, len) };
        FINE
    });
    assert_eq!(code(status), FINE, "the child did not find the bytes of {what}");
    hm.space().settle().unwrap();
    // SAFETY: the caller's memory, mapped at `at` and only used by this thread.
    let untouched = unsafe { all_are(at, len, OLD) };
    assert!(untouched, "the child's writes to {what} reached the parent");
}

/// The program unmaps the first pages of registered memory after the fork was prepared and
/// before the fork. The rest, still mapped at the fork, must be the child's own copy: the
/// child's writes there must not reach the parent. (The child skipped a part of which any page
/// was unmapped, leaving the rest a shared view of the parent's memory.)
#[test]
fn registered_memory_partly_unmapped_before_the_fork_is_private_in_the_child() {
    let _serial = serial();
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let p = registered(&hm, OLD) as usize;
    let gone = 4 * PS;
    let (rest, rest_len) = (p + gone, LEN - gone);
    let unmap_some = || {
        // SAFETY: unmaps the first pages of the registered memory this test mapped at `p`; nothing
        // references them.
        assert_eq!(unsafe { libc::munmap(p as *mut _, gone) }, 0);
    };
    child_copy_is_private(&hm, unmap_some, rest, rest_len, "partly unmapped registered memory");
    hm.unregister(rest as *const u8, rest_len).unwrap();
    // SAFETY: unmaps the rest of this test's mapping, which nothing references.
    unsafe { libc::munmap(rest as *mut _, rest_len) };
}

/// The program moves registered memory after the fork was prepared and before the fork: the
/// child must have a private copy at the new address (deterministic form of the race in
/// `registered_memory_moved_during_a_fork_is_private_in_the_child`).
#[test]
fn registered_memory_moved_before_the_fork_is_private_in_the_child() {
    let _serial = serial();
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let p = registered(&hm, OLD) as usize;
    let to = placeholder(LEN);
    let move_it = || {
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        // SAFETY: moves the registered LEN bytes this test mapped at `p` over its own placeholder
        // at `to`; no reference into either exists.
        let q = unsafe { libc::mremap(p as *mut _, LEN, LEN, flags, to as *mut libc::c_void) };
        assert_eq!(q as usize, to, "mremap: {}", std::io::Error::last_os_error());
    };
    child_copy_is_private(&hm, move_it, to, LEN, "moved registered memory");
    hm.unregister(to as *const u8, LEN).unwrap();
    // SAFETY: unmaps the moved mapping, this test's own, which nothing references.
    unsafe { libc::munmap(to as *mut _, LEN) };
}

/// The program maps its own memory over registered memory after the fork was prepared and
/// before the fork: the child must see that memory there, not a copy of the registered bytes
/// (deterministic form of `memory_mapped_over_unmapped_registered_memory_is_the_childs`).
#[test]
fn memory_mapped_over_registered_memory_before_the_fork_is_the_childs() {
    let _serial = serial();
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let p = registered(&hm, OLD) as usize;
    let map_over = || {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
        // SAFETY: MAP_FIXED replaces only the registered memory this test mapped at `p`, which
        // nothing references.
        let q = unsafe { libc::mmap(p as *mut _, LEN, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        assert_eq!(q as usize, p, "mmap: {}", std::io::Error::last_os_error());
        // SAFETY: `q` is the LEN-byte read-write mapping just made, only this thread's.
        unsafe { std::ptr::write_bytes(q.cast::<u8>(), NEW, LEN) };
    };
    let status = fork_after_prepare(&hm, map_over, || {
        // SAFETY: in the child: the new LEN-byte read-write mapping at `p`, inherited; the child
        // has no other thread.
        if unsafe { all_are(p, LEN, NEW) } {
            FINE
        } else {
            WRONG
        }
    });
    assert_eq!(code(status), FINE, "the child found the unmapped registered bytes over its new memory");
    hm.space().settle().unwrap();
    // SAFETY: the new mapping at `p`, only used by this thread.
    assert!(unsafe { all_are(p, LEN, NEW) }, "the parent's new memory changed");
    // SAFETY: unmaps this test's own mapping, which nothing references.
    unsafe { libc::munmap(p as *mut _, LEN) };
}

/// Rounds of a race test: at least `MIN_ROUNDS`, and more, up to `MAX_ROUNDS`, while none has
/// been conclusive (the fork came before the other thread's change in each: on a loaded
/// machine that can happen six times running).
const MIN_ROUNDS: usize = 6;
const MAX_ROUNDS: usize = 30;

/// Whether a race test has run enough rounds after `round`, `conclusive` of them counting.
fn enough(round: usize, conclusive: usize) -> bool {
    round + 1 >= MIN_ROUNDS && conclusive > 0
}

/// The program maps new memory of its own over registered memory (`MAP_FIXED`: the registered
/// memory is unmapped) while a fork is prepared. A child forked after that must see the new
/// memory there: the fork's copy of the registered memory must not be put over it.
#[test]
fn memory_mapped_over_unmapped_registered_memory_is_the_childs() {
    let _serial = serial();
    let (hm, _dev, _big) = setup();
    let mut conclusive = 0;
    for round in 0..MAX_ROUNDS {
        let p = registered(&hm, OLD);
        let addr = p as usize;
        let map_over = move || {
            // In one step (the kernel unmaps the old memory, and the reader is told, as for a
            // munmap): nothing else in the process can take the hole meanwhile.
            let p = addr as *mut libc::c_void;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
            // SAFETY: MAP_FIXED only replaces the registered memory this test mapped at `addr`; the
            // forking thread and child hold no reference into it (the child reads only if `done`).
            let q = unsafe { libc::mmap(p, LEN, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
            assert_eq!(q, p, "mmap: {}", std::io::Error::last_os_error());
            // SAFETY: `q` is the LEN-byte read-write mapping just made; only this thread touches it
            // until joined.
            unsafe { std::ptr::write_bytes(q.cast::<u8>(), NEW, LEN) };
        };
        let status = fork_during(&hm, &UNMAPPED, map_over, || {
            // SAFETY: in the child, `done` was set before the fork: the LEN bytes at `addr` are the
            // new read-write mapping, inherited, and the child has no other thread to unmap them.
            let v = unsafe { std::slice::from_raw_parts(addr as *const u8, LEN) };
            if v.iter().all(|&b| b == NEW) {
                FINE
            } else {
                WRONG
            }
        });
        let c = code(status);
        assert_ne!(c, WRONG, "round {round}: the child found the unmapped registered bytes over its new memory");
        conclusive += usize::from(c == FINE);
        // SAFETY: the other thread is joined: `addr` holds its LEN-byte anonymous mapping, which
        // only this thread uses now.
        let v = unsafe { std::slice::from_raw_parts(addr as *const u8, LEN) };
        assert!(v.iter().all(|&b| b == NEW), "round {round}: the parent's new memory changed");
        // SAFETY: unmaps only that mapping, this test's own; `v` is not used after.
        unsafe { libc::munmap(addr as *mut _, LEN) };
        if enough(round, conclusive) {
            break;
        }
    }
    assert!(conclusive > 0, "no fork came after the unmap: the test proved nothing");
}

/// The program moves registered memory elsewhere (`mremap`) while a fork is prepared. A child
/// forked after that must have a private copy at the new address: its writes there must not
/// reach the parent.
#[test]
fn registered_memory_moved_during_a_fork_is_private_in_the_child() {
    let _serial = serial();
    let (hm, _dev, _big) = setup();
    let mut conclusive = 0;
    for round in 0..MAX_ROUNDS {
        let p = registered(&hm, OLD);
        let addr = p as usize;
        // Where the memory moves: a placeholder the move replaces.
        // SAFETY: a new PROT_NONE placeholder where the kernel chooses replaces no existing
        // mapping.
        let to = unsafe {
            libc::mmap(std::ptr::null_mut(), LEN, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(to, libc::MAP_FAILED);
        let to = to as usize;
        let move_it = move || {
            let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
            // SAFETY: moves the registered LEN bytes this test mapped at `addr` over its own
            // placeholder at `to`; no reference into either exists in the parent.
            let q = unsafe { libc::mremap(addr as *mut _, LEN, LEN, flags, to as *mut libc::c_void) };
            assert_eq!(q as usize, to, "mremap: {}", std::io::Error::last_os_error());
        };
        let status = fork_during(&hm, &MOVED, move_it, || {
            // SAFETY: in the child, `done` was set before the fork: the moved LEN bytes are mapped
            // read-write at `to`, inherited, and the child has no other thread to unmap them.
            let v = unsafe { std::slice::from_raw_parts_mut(to as *mut u8, LEN) };
            if !v.iter().all(|&b| b == OLD) {
                return WRONG;
            }
            v.fill(NEW);
            FINE
        });
        let c = code(status);
        assert_ne!(c, WRONG, "round {round}: the child did not find the moved bytes");
        conclusive += usize::from(c == FINE);
        // The parent's memory at the new address is untouched by the child.
        hm.space().settle().unwrap();
        // SAFETY: the move is done (its thread joined): `to` holds our LEN-byte mapping, which only
        // this thread uses.
        let v = unsafe { std::slice::from_raw_parts(to as *const u8, LEN) };
        assert!(v.iter().all(|&b| b == OLD), "round {round}: the child's writes reached the parent");
        hm.unregister(to as *const u8, LEN).unwrap();
        // SAFETY: unmaps only the moved mapping, this test's own; `v` is not used after.
        unsafe { libc::munmap(to as *mut _, LEN) };
        if enough(round, conclusive) {
            break;
        }
    }
    assert!(conclusive > 0, "no fork came after the move: the test proved nothing");
}

/// Whether the mapping holding `addr` is `MAP_SHARED` (the `s` of `/proc/self/maps`). It runs in
/// fork children of a multithreaded parent, where another thread may have held malloc's lock at
/// the fork: so it allocates nothing, reading with `open`/`read` into buffers on the stack.
fn maps_shared(addr: usize) -> Option<bool> {
    // SAFETY: a NUL-terminated path and flags; the descriptor is closed below.
    let fd = unsafe { libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // Only a line's start matters ("start-end perms"): the rest of a long line is dropped.
    let (mut buf, mut line, mut n_line) = ([0u8; 4096], [0u8; 64], 0);
    let mut found = None;
    'read: loop {
        // SAFETY: reads at most `buf.len()` bytes into `buf`, which this frame owns.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        for &c in &buf[..n as usize] {
            if c == b'\n' {
                found = maps_line_shared(&line[..n_line], addr);
                if found.is_some() {
                    break 'read;
                }
                n_line = 0;
            } else if n_line < line.len() {
                line[n_line] = c;
                n_line += 1;
            }
        }
    }
    // SAFETY: `fd` is the descriptor opened above, closed once.
    unsafe { libc::close(fd) };
    found
}

/// For a line of `/proc/self/maps` whose range holds `addr`, whether it is shared.
fn maps_line_shared(line: &[u8], addr: usize) -> Option<bool> {
    let line = std::str::from_utf8(line).ok()?;
    let (range, rest) = line.split_once(' ')?;
    let (s, e) = range.split_once('-')?;
    let (s, e) = (usize::from_str_radix(s, 16).ok()?, usize::from_str_radix(e, 16).ok()?);
    (s..e).contains(&addr).then(|| rest.as_bytes().get(3) == Some(&b's'))
}

/// Forks while another thread registers and unregisters private memory in a loop. However the
/// fork falls, the child's copy of that memory is private: never the manager's shared mapping,
/// through which the child and the parent would see each other's writes.
#[test]
fn a_fork_during_unregister_leaves_the_child_private_memory() {
    let _serial = serial();
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let len = 4 << 20;
    let p = anon(len, OLD);
    let addr = p as usize;
    // The check itself: registered memory is the manager's shared mapping, private once given back.
    assert_eq!(maps_shared(addr), Some(false), "private before registering");
    hm.register(addr as *const u8, len).unwrap();
    assert_eq!(maps_shared(addr), Some(true), "shared while registered");
    hm.unregister(addr as *const u8, len).unwrap();
    assert_eq!(maps_shared(addr), Some(false), "private again");
    let stop = AtomicBool::new(false);
    let (shared, forks) = std::thread::scope(|s| {
        let (hm, stop) = (&hm, &stop);
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                hm.register(addr as *const u8, len).unwrap();
                hm.unregister(addr as *const u8, len).unwrap();
            }
        });
        let (mut shared, mut forks) = (0, 0);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            let status = fork_with(|| match maps_shared(addr) {
                Some(false) => FINE,
                Some(true) => WRONG,
                None => TOO_LATE,
            });
            shared += usize::from(code(status) == WRONG);
            forks += 1;
        }
        stop.store(true, Ordering::Relaxed);
        (shared, forks)
    });
    assert_eq!(shared, 0, "{shared} of {forks} children shared the memory with the parent");
    // SAFETY: the register/unregister thread is joined; unmaps only the memory this test mapped at
    // `p`.
    unsafe { libc::munmap(p.cast(), len) };
}

/// Spawning a program (`std::process::Command`) while a device holds private data. The plain
/// spawn is a `posix_spawn` (a `vfork`-like clone that shares the memory until the exec): no
/// fork handler runs, so nothing is flushed or copied. A spawn with a `pre_exec` hook is a real
/// `fork()`: the handlers run and the child copies the memory before its exec (time only), and
/// the parent's data is untouched either way.
#[test]
fn spawning_a_program_forks_hetmm_memory_only_through_fork() {
    let _serial = serial();
    use std::os::unix::process::CommandExt;
    let (hm, dev, big) = setup();
    let before = hm.stats().forks;
    let t = Instant::now();
    assert!(std::process::Command::new("true").status().unwrap().success());
    let plain = t.elapsed();
    assert_eq!(hm.stats().forks, before, "a plain spawn ran the fork handlers");
    let mut cmd = std::process::Command::new("true");
    // SAFETY: the hook does nothing (allocation-free, async-signal-safe).
    unsafe { cmd.pre_exec(|| Ok(())) };
    let t = Instant::now();
    assert!(cmd.status().unwrap().success());
    let forked = t.elapsed();
    assert_eq!(hm.stats().forks, before + 1, "a spawn with pre_exec forks");
    eprintln!("spawn: {plain:?} plain, {forked:?} through fork() with {} MiB on the device", BIG >> 20);
    hm.migrate(big.ptr(), BIG as u64, Proc::Cpu).unwrap();
    assert!(big.as_slice().iter().all(|&b| b == 3));
    drop(dev);
}

/// Forks while another thread registers and unmaps other memory in a loop, so that many
/// prepares find an unmap read and not yet applied and are done again (see the host's
/// `prepare_all`). A prepare given up for another is not a fork: the count of forks is the
/// number of forks made (it counted every prepare: 1690 for 993 forks).
#[test]
fn a_prepare_done_again_is_not_counted_as_a_fork() {
    let _serial = serial();
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let dev =
        hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 64 << 20, ..SimConfig::default() }).unwrap()).unwrap();
    // Device-only data, for every prepare to flush.
    let mut buf = hm.alloc::<u8>(8 << 20).unwrap();
    buf.as_mut_slice().fill(3);
    hm.migrate(buf.ptr(), buf.byte_len(), dev.proc()).unwrap();
    let stop = AtomicBool::new(false);
    let forks = 100;
    let before = hm.stats().forks;
    std::thread::scope(|s| {
        let (hm, stop) = (&hm, &stop);
        let churn = s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let p = registered(hm, OLD);
                // SAFETY: `p` is the LEN-byte mapping `registered` just made in this thread;
                // nothing else uses it.
                assert_eq!(unsafe { libc::munmap(p.cast(), LEN) }, 0);
            }
        });
        for _ in 0..forks {
            assert_eq!(code(fork_with(|| FINE)), FINE);
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
    });
    assert_eq!(hm.stats().forks - before, forks, "forks counted");
}

/// A `fork()` on a thread that holds the fork gate (a hetmm operation in progress: here
/// `hold_forks`, as a callback or signal handler that forks would) used to deadlock in the
/// prepare handler, which waited for every holder, its own thread included. Now it goes ahead
/// without waiting for its own hold: the child gets its copy of device-only data (nothing lost)
/// and the parent goes on.
#[test]
fn a_fork_on_a_thread_inside_a_hetmm_operation_does_not_hang() {
    let _serial = serial();
    let body = std::thread::spawn(|| {
        let hm = Hetmm::new().expect("userfaultfd and memfd available");
        let dev = hm
            .attach_sim(SimDevice::new(SimConfig { memory_bytes: 64 << 20, ..SimConfig::default() }).unwrap())
            .unwrap();
        let mut buf = hm.alloc::<u8>(8 << 20).unwrap();
        buf.as_mut_slice().fill(3);
        hm.migrate(buf.ptr(), buf.byte_len(), dev.proc()).unwrap();
        let (p, n) = (buf.ptr() as usize, buf.byte_len() as usize);
        let hold = hm.space().hold_forks().unwrap();
        let status = fork_with(|| {
            // SAFETY: the child's private copy of `buf` (n bytes at p), which nothing else uses.
            let all = unsafe { std::slice::from_raw_parts(p as *const u8, n) }.iter().all(|&b| b == 3);
            match (hetmm::host::fork::last_child_error(), hetmm::host::fork::last_child_lost_bytes(), all) {
                (Some(_), _, _) => COPY_FAILED,
                (None, 0, true) => FINE,
                _ => WRONG,
            }
        });
        drop(hold);
        assert_eq!(code(status), FINE, "the child's copy of device-only data");
        // The parent goes on.
        hm.migrate(buf.ptr(), buf.byte_len(), Proc::Cpu).unwrap();
        assert!(buf.as_slice().iter().all(|&b| b == 3));
        assert_eq!(hm.stats().bytes_fork_lost, 0);
    });
    let t = Instant::now();
    while !body.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(60), "fork() inside a hetmm operation hung");
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Err(p) = body.join() {
        std::panic::resume_unwind(p);
    }
}

/// The environment variable that makes this test binary, run again by [`in_own_process`], play
/// the scenario it names.
const SCENARIO_ENV: &str = "HETMM_FORK_RACES_SCENARIO";

/// How long a scenario run by [`in_own_process`] may take before it counts as hung.
const OWN_PROCESS_LIMIT: Duration = Duration::from_secs(30);

/// Runs `body` in a process of its own (this test binary again, running only test `name`),
/// which must end well within [`OWN_PROCESS_LIMIT`], one such test at a time. A fork that
/// deadlocks leaves threads stuck in the fork handlers, holding their locks, which would hang
/// every later fork of the test process (and the test run): the process is killed instead, and
/// the test fails saying so.
fn in_own_process(name: &str, body: impl FnOnce()) {
    let limit = OWN_PROCESS_LIMIT;
    let _serial = serial();
    if std::env::var_os(SCENARIO_ENV).is_some_and(|v| v == name) {
        body();
        return;
    }
    let log_path = std::env::temp_dir().join(format!("hetmm-{name}-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(SCENARIO_ENV, name)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if t.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    match status {
        None => panic!("{name}: hung (killed after {limit:?}; a fork deadlocked?)\n{out}"),
        Some(s) => assert!(s.success(), "{name}: the scenario failed ({s})\n{out}"),
    }
}

/// Waits (at most 10 s) until `cond` holds, or fails with `what`.
fn wait_until(cond: impl Fn() -> bool, what: &str) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// 8 MiB of hetmm memory holding 3s, all of it only on a simulated device.
fn device_only_data() -> (Hetmm, hetmm::Device<SimDevice>, hetmm::SharedBuf<u8>) {
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let dev =
        hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 64 << 20, ..SimConfig::default() }).unwrap()).unwrap();
    let mut buf = hm.alloc::<u8>(8 << 20).unwrap();
    buf.as_mut_slice().fill(3);
    hm.migrate(buf.ptr(), buf.byte_len(), dev.proc()).unwrap();
    (hm, dev, buf)
}

/// The check of a fork child (allocation-free): whether it has all of the `n` bytes at `p`
/// (holding 3s), its copy made without error and nothing lost.
fn child_has_everything(p: usize, n: usize) -> i32 {
    if hetmm::host::fork::last_child_error().is_some() {
        return COPY_FAILED;
    }
    // Lost memory is inaccessible (reading it raises SIGSEGV).
    if hetmm::host::fork::last_child_lost_bytes() != 0 {
        return LOST;
    }
    // SAFETY: in the child: its private copy of the hetmm memory at `p` (`n` bytes, mapped
    // read-write, none of it lost), which nothing else uses.
    if unsafe { all_are(p, n, 3) } {
        FINE
    } else {
        WRONG
    }
}

/// On a thread of its own: enters a hetmm operation (holds the fork gate, as a callback or
/// signal handler that forks would), says so on `held`, and once told on `go` forks from inside
/// it, the child checking it has the `n` bytes at `p`. The fork's status.
fn fork_inside_when_told(hm: &Hetmm, held: &Sender<()>, go: &Receiver<()>, p: usize, n: usize) -> i32 {
    let hold = hm.space().hold_forks().unwrap();
    held.send(()).unwrap();
    go.recv_timeout(Duration::from_secs(20)).expect("told to fork");
    let status = fork_with(|| child_has_everything(p, n));
    drop(hold);
    status
}

/// Two forks at once: a thread inside a hetmm operation ([`fork_inside_when_told`]) forks once
/// `other`, on another thread, has a fork waiting for that operation. Both forks' statuses:
/// the one from inside, then `other`'s.
fn fork_inside_once_another_waits(hm: &Hetmm, p: usize, n: usize, other: impl FnOnce() -> i32 + Send) -> (i32, i32) {
    std::thread::scope(|s| {
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let inside = s.spawn(move || fork_inside_when_told(hm, &held_tx, &go_rx, p, n));
        held_rx.recv_timeout(Duration::from_secs(10)).expect("the operation began");
        let other = s.spawn(other);
        wait_until(|| hm.space().forks_waiting() > 0, "the other fork never waited for the operation");
        go_tx.send(()).unwrap();
        (inside.join().unwrap(), other.join().unwrap())
    })
}

/// After two forks since `before` forks: both counted, nothing lost, and `buf` (3s, prepared
/// on the device) whole in the parent.
fn two_forks_lost_nothing(hm: &Hetmm, before: u64, buf: &hetmm::SharedBuf<u8>) {
    assert_eq!(hm.stats().forks - before, 2);
    assert_eq!(hm.stats().bytes_fork_lost, 0);
    hm.migrate(buf.ptr(), buf.byte_len(), Proc::Cpu).unwrap();
    assert!(buf.as_slice().iter().all(|&b| b == 3));
}

/// Two forks at once, one of them from inside a hetmm operation (its thread holds the fork
/// gate, as a callback or signal handler that forks would), the other from a thread outside
/// any, whose prepare is already waiting for that operation when the first forks. They
/// deadlocked: the outside prepare held the fork handler's registry lock while it waited,
/// without limit, for the operation to end, and the fork inside the operation waited, without
/// limit, for that lock. Both forks must go through, each child with all of the memory.
#[test]
fn a_fork_inside_an_operation_while_another_thread_forks_does_not_deadlock() {
    in_own_process("a_fork_inside_an_operation_while_another_thread_forks_does_not_deadlock", || {
        let (hm, _dev, buf) = device_only_data();
        let (p, n) = (buf.ptr() as usize, buf.byte_len() as usize);
        let before = hm.stats().forks;
        let (inside, outside) = fork_inside_once_another_waits(&hm, p, n, || fork_with(|| child_has_everything(p, n)));
        assert_eq!(code(inside), FINE, "the child of the fork from inside the operation");
        assert_eq!(code(outside), FINE, "the child of the fork from outside");
        two_forks_lost_nothing(&hm, before, &buf);
    });
}

/// Two threads inside hetmm operations on the same address space fork at once (the second
/// while the first waits for its operation to end). Each waited for the other's operation, a
/// bounded time, then went ahead without the gate: every child lost all private memory. A
/// thread that is itself forking does not change memory: each fork waits for the other's
/// fork, not for its operation, and both children get all of the memory.
#[test]
fn two_forks_inside_operations_on_the_same_space_both_give_the_child_everything() {
    in_own_process("two_forks_inside_operations_on_the_same_space_both_give_the_child_everything", || {
        let (hm, _dev, buf) = device_only_data();
        let (p, n) = (buf.ptr() as usize, buf.byte_len() as usize);
        let before = hm.stats().forks;
        let t = Instant::now();
        let (second, first) = fork_inside_once_another_waits(&hm, p, n, || {
            let hold = hm.space().hold_forks().unwrap();
            let status = fork_with(|| child_has_everything(p, n));
            drop(hold);
            status
        });
        let took = t.elapsed();
        assert_eq!(code(first), FINE, "the child of the first fork (took {took:?})");
        assert_eq!(code(second), FINE, "the child of the second fork (took {took:?})");
        two_forks_lost_nothing(&hm, before, &buf);
    });
}

/// As `a_fork_inside_an_operation_while_another_thread_forks_does_not_deadlock`, with two
/// address spaces: the outside fork has taken the first one's gate and waits for the
/// operation on the second when the thread inside that operation forks. That fork cannot have
/// the first space (the other fork holds it, waiting for this thread): it waits a bounded time,
/// then its child goes without the first space's private memory (inaccessible there, counted),
/// and gets the second's; the outside fork then goes through, its child with everything.
#[test]
fn a_fork_inside_an_operation_while_another_fork_holds_another_space_is_bounded() {
    in_own_process("a_fork_inside_an_operation_while_another_fork_holds_another_space_is_bounded", || {
        // Prepared in this order: `first`, then `second`.
        let (first, _dev1, buf1) = device_only_data();
        let (second, _dev2, buf2) = device_only_data();
        let (p1, n1) = (buf1.ptr() as usize, buf1.byte_len() as usize);
        let (p2, n2) = (buf2.ptr() as usize, buf2.byte_len() as usize);
        let t = Instant::now();
        let (inside, outside) = std::thread::scope(|s| {
            let second = &second;
            let (held_tx, held_rx) = std::sync::mpsc::channel();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let inside = s.spawn(move || {
                let hold = second.space().hold_forks().unwrap();
                held_tx.send(()).unwrap();
                go_rx.recv_timeout(Duration::from_secs(20)).expect("told to fork");
                let status = fork_with(|| match child_has_everything(p2, n2) {
                    // The first space's memory: lost is fine, the second's must be whole.
                    LOST if hetmm::host::fork::last_child_lost_bytes() == n1 as u64 => {
                        // The lost bytes are the first space's, none of these.
                        // SAFETY: the child's private copy of the second space's `n2` bytes
                        // at `p2`, none of it lost, which nothing else uses.
                        if unsafe { all_are(p2, n2, 3) } {
                            LOST
                        } else {
                            WRONG
                        }
                    }
                    c => c,
                });
                drop(hold);
                status
            });
            held_rx.recv_timeout(Duration::from_secs(10)).expect("the operation began");
            let outside = s.spawn(move || {
                fork_with(|| match child_has_everything(p1, n1) {
                    FINE => child_has_everything(p2, n2),
                    c => c,
                })
            });
            wait_until(|| second.space().forks_waiting() > 0, "the outside fork never waited for the operation");
            go_tx.send(()).unwrap();
            (inside.join().unwrap(), outside.join().unwrap())
        });
        let took = t.elapsed();
        let inside = code(inside);
        assert!(inside == FINE || inside == LOST, "the child of the fork inside the operation: {inside}");
        assert_eq!(code(outside), FINE, "the child of the fork from outside");
        if inside == LOST {
            assert_eq!(first.stats().bytes_fork_lost, n1 as u64, "lost memory is counted");
        }
        assert!(took < Duration::from_secs(10), "{took:?}");
        for (hm, buf) in [(&first, &buf1), (&second, &buf2)] {
            hm.migrate(buf.ptr(), buf.byte_len(), Proc::Cpu).unwrap();
            assert!(buf.as_slice().iter().all(|&b| b == 3));
        }
    });
}

/// Private memory the program registered and never unregistered is its own private memory
/// again once the manager is dropped: a fork child's writes to it stay the child's. It stayed
/// the manager's shared mapping, unmanaged, and every later child shared it with this process.
#[test]
fn registered_memory_is_private_again_once_the_manager_is_dropped() {
    let _serial = serial();
    let len = 4 << 20;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks: it replaces
    // nothing.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    let p = p as usize;
    // SAFETY: the `len`-byte mapping just made.
    unsafe { std::ptr::write_bytes(p as *mut u8, 0x11, len) };
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    hm.register(p as *const u8, len).unwrap();
    drop(hm);
    let shared = common::maps_meeting(p as u64, (p + len) as u64).iter().any(|m| m.perms.ends_with('s'));
    let status = fork_with(|| {
        // SAFETY: the child writes the test's mapping, inherited (allocating nothing).
        unsafe { std::ptr::write_bytes(p as *mut u8, 0x55, len) };
        FINE
    });
    // SAFETY: the test's mapping, alive until the munmap below.
    let kept = unsafe { std::slice::from_raw_parts(p as *const u8, len) }.iter().all(|&b| b == 0x11);
    // SAFETY: the test's own mapping, not used afterwards.
    unsafe { libc::munmap(p as *mut _, len) };
    assert_eq!(code(status), FINE);
    assert!(!shared, "the memory is still a shared mapping");
    assert!(kept, "the child's writes reached this process");
}

/// Memory the program grew in place with `mremap` and did not touch before the fork is the
/// child's own, fresh (zeros), as the parent's first touch makes it: it stayed a shared mapping
/// of the parent's memfd, so two children forked after the grow saw each other's writes there.
#[test]
fn memory_grown_in_place_and_untouched_at_the_fork_is_each_childs_own() {
    let _turn = serial();
    let hm = Hetmm::new().unwrap();
    let mut buf = hm.alloc::<u8>(LEN).unwrap();
    buf.as_mut_slice().fill(OLD);
    let p = buf.ptr() as usize;
    // SAFETY: grows `buf`'s own mapping in place (no MREMAP_MAYMOVE): nothing else moves, and
    // no slice of `buf` is held.
    let r = unsafe { libc::mremap(p as *mut _, LEN, 2 * LEN, 0) };
    if r as usize != p {
        eprintln!("skipped: no room to grow in place here ({})", std::io::Error::last_os_error());
        return;
    }
    let grown = p + LEN;
    let first = fork_with(|| {
        // SAFETY: in the child: the grown part is mapped and the child has no other thread.
        let fresh = unsafe { all_are(grown, LEN, 0) };
        // SAFETY: the child's own copy of the grown part, which it alone uses.
        unsafe { std::ptr::write_bytes(grown as *mut u8, NEW, LEN) };
        if fresh {
            FINE
        } else {
            WRONG
        }
    });
    // SAFETY: as in the first child.
    let second = fork_with(|| if unsafe { all_are(grown, LEN, 0) } { FINE } else { WRONG });
    assert_eq!(code(first), FINE, "the first child read zeros in the grown part");
    assert_eq!(code(second), FINE, "the second child did not see the first child's writes");
    // SAFETY: `buf`'s mapping, grown, which no one writes now.
    let kept = unsafe { all_are(p, LEN, OLD) && all_are(grown, LEN, 0) };
    assert!(kept, "the parent's bytes are as before");
    // SAFETY: shrinks the mapping back to `buf`'s length, its own grown part, unused now.
    assert_eq!(unsafe { libc::mremap(p as *mut _, 2 * LEN, LEN, 0) } as usize, p);
}

/// Registered memory shrunk and grown again in place, untouched at the fork: the child reads
/// zeros in the regrown part, as the parent does, not the bytes the program gave up with the
/// shrink (the memfd still holds them).
#[test]
fn registered_memory_regrown_in_place_reads_zeros_in_the_child_too() {
    let _turn = serial();
    let hm = Hetmm::new().unwrap();
    let p = anon(4 * PS, OLD) as usize;
    hm.register(p as *const u8, 4 * PS).unwrap();
    let (len, half) = (4 * PS, 2 * PS);
    // SAFETY: shrinks this test's registered mapping; no reference covers it.
    assert_eq!(unsafe { libc::mremap(p as *mut _, len, half, 0) } as usize, p);
    hm.space().settle().unwrap();
    // SAFETY: grows it back in place (no MREMAP_MAYMOVE), over nothing else of this test.
    let r = unsafe { libc::mremap(p as *mut _, half, len, 0) };
    if r as usize != p {
        eprintln!("skipped: no room to grow back in place here ({})", std::io::Error::last_os_error());
        return;
    }
    let both = || {
        // SAFETY: the test's mapping, grown back, which no one writes meanwhile.
        unsafe { all_are(p + half, half, 0) && all_are(p, half, OLD) }
    };
    let child = fork_with(|| if both() { FINE } else { WRONG });
    assert_eq!(code(child), FINE, "the child read zeros in the regrown part and the data before it");
    assert!(both(), "so does the parent");
    // SAFETY: this test's own mapping, unused now.
    assert_eq!(unsafe { libc::munmap(p as *mut _, len) }, 0);
}

/// The files hetmm holds that keep memory or the parent's address space alive: its memfds and
/// its userfaultfd, as `/proc/self/fd` names them.
const HELD_FILES: [&[u8]; 2] = [b"/memfd:hetmm", b"anon_inode:[userfaultfd]"];

/// Whether descriptor `fd` refers to one of [`HELD_FILES`] (allocation-free, for a fork child).
fn holds_hetmm_file(fd: i32) -> bool {
    let mut path = *b"/proc/self/fd/\0\0\0\0\0\0\0\0\0\0\0";
    let mut digits = [0u8; 10];
    let (mut n, mut k) = (fd as u32, 0);
    loop {
        digits[k] = b'0' + (n % 10) as u8;
        (n, k) = (n / 10, k + 1);
        if n == 0 {
            break;
        }
    }
    for (i, d) in digits[..k].iter().rev().enumerate() {
        path[14 + i] = *d;
    }
    let mut target = [0u8; 64];
    // SAFETY: `path` is NUL-terminated (the digits end before its last byte); `target` is a
    // live local buffer of the length given.
    let n = unsafe { libc::readlink(path.as_ptr().cast(), target.as_mut_ptr().cast(), target.len()) };
    n > 0 && HELD_FILES.iter().any(|p| target[..n as usize].starts_with(p))
}

/// A fork child that does not exec lets go of hetmm's memfds and userfaultfd once it has its
/// copy: it kept them open (the parent's objects are never dropped there), and a memfd held
/// open keeps its pages allocated for as long as the child lives, whatever the parent frees.
#[test]
fn a_fork_child_lets_go_of_the_parents_memfds_and_userfaultfd() {
    let _turn = serial();
    let fds = || -> Vec<i32> {
        let dir = std::fs::read_dir("/proc/self/fd").unwrap();
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter(|&fd| holds_hetmm_file(fd)).collect()
    };
    // Only this test's: an earlier test's host may still be stopping its threads.
    let before = fds();
    let hm = Hetmm::new().unwrap();
    let mut buf = hm.alloc::<u8>(LEN).unwrap();
    buf.as_mut_slice().fill(OLD);
    let p = anon(4 * PS, OLD) as usize;
    hm.register(p as *const u8, 4 * PS).unwrap();
    let held: Vec<i32> = fds().into_iter().filter(|fd| !before.contains(fd)).collect();
    assert!(held.len() >= 3, "a region's memfd, a registration's and the uffd: {held:?}");
    let status = fork_with(|| {
        // SAFETY: the child's copy of the buffer and of the registered memory, its own now.
        let kept = unsafe { all_are(buf.ptr() as usize, LEN, OLD) && all_are(p, 4 * PS, OLD) };
        if !kept {
            WRONG
        } else if held.iter().any(|&fd| holds_hetmm_file(fd)) {
            LOST
        } else {
            FINE
        }
    });
    assert_eq!(code(status), FINE, "the child kept its bytes ({WRONG} if not) and let the files go ({LOST} if not)");
    assert!(held.iter().all(|&fd| holds_hetmm_file(fd)), "the parent keeps them");
    hm.unregister(p as *const u8, 4 * PS).unwrap();
    // SAFETY: the test's own mapping, unregistered and unused now.
    assert_eq!(unsafe { libc::munmap(p as *mut _, 4 * PS) }, 0);
}

/// Moves the second half of `[p, p + LEN)` with `mremap` to a new place, applied by the core
/// (two CPU sides over one memfd); returns the new place.
fn move_second_half(hm: &Hetmm, p: usize) -> usize {
    let half = LEN / 2;
    let to = placeholder(half);
    let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    // SAFETY: moves managed memory of this test (no reference to it is alive) over its own
    // placeholder.
    let q = unsafe { libc::mremap((p + half) as *mut _, half, half, flags, to as *mut libc::c_void) };
    assert_eq!(q as usize, to, "mremap: {}", std::io::Error::last_os_error());
    hm.space().settle().unwrap();
    assert!(hm.space().page_state(to as u64).is_some(), "the moved half is managed where it went");
    to
}

/// A fork child finds both halves of memory of which the program moved one half away: the first
/// CPU side to copy its part made every other view of the shared memfd zeros, the moved half
/// included, before its own side copied it (found by an audit).
fn both_halves_in_the_child(hm: &Hetmm, p: usize) {
    let to = move_second_half(hm, p);
    let half = LEN / 2;
    let status = fork_with(|| {
        // SAFETY: in the child: both halves are mapped read-write, and it has no other thread.
        let (a, b) = unsafe { (all_are(p, half, OLD), all_are(to, half, OLD)) };
        i32::from(!a) | i32::from(!b) << 1
    });
    assert_eq!(code(status), FINE, "the child lost bytes: 1 = the half left in place, 2 = the half moved");
}

#[test]
fn registered_memory_half_moved_then_forked_keeps_both_halves_in_the_child() {
    let _serial = serial();
    let hm = Hetmm::new().unwrap();
    let p = registered(&hm, OLD) as usize;
    both_halves_in_the_child(&hm, p);
}

#[test]
fn allocated_memory_half_moved_then_forked_keeps_both_halves_in_the_child() {
    let _serial = serial();
    let hm = Hetmm::new().unwrap();
    let mut buf = hm.alloc::<u8>(LEN).unwrap();
    buf.as_mut_slice().fill(OLD);
    both_halves_in_the_child(&hm, buf.ptr() as usize);
}

/// A sparse buffer larger than this machine's memory: the child's copy made a private writable
/// temporary of the whole view, which the kernel refused (ENOMEM under the default overcommit),
/// and the child lost the whole buffer (found by an audit).
#[test]
fn a_large_sparse_buffer_is_still_the_childs_after_a_fork() {
    let _serial = serial();
    let hm = Hetmm::new().unwrap();
    let len = hetmm::memory_total().map_or(64 << 30, |m| (2 * m).next_multiple_of(1 << 30)) as usize;
    let mut buf = hm.alloc::<u8>(len).unwrap();
    let p = buf.ptr() as usize;
    {
        let mut s = buf.as_mut_slice();
        s[0] = 0x11;
        s[len / 2] = 0x22;
        s[len - 1] = 0x33;
    }
    let status = fork_with(|| {
        if hetmm::host::fork::last_child_error().is_some() {
            return COPY_FAILED;
        }
        // SAFETY: in the child: the buffer's copy is mapped readable (a sealed one would kill the
        // child, which the status shows), and it has no other thread.
        let ok = unsafe { [(0, 0x11), (len / 2, 0x22), (len - 1, 0x33)].iter().all(|&(i, v)| all_are(p + i, 1, v)) };
        if ok {
            FINE
        } else {
            WRONG
        }
    });
    assert_eq!(code(status), FINE, "the child's copy of the buffer");
}
