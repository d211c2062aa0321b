//! `fork()` of a process that uses hetmm: `pthread_atfork` handlers for every tracked address
//! space (see `hetmm_core::fork` for what the child sees).
//!
//! - prepare (parent, before the fork): every live address space is prepared
//!   ([`AddressSpace::fork_prepare`]: data held only by devices is copied into host memory,
//!   nothing changes state, page-state changes wait), and a pipe is made for the child to say
//!   that it has its copy. The registry of address spaces is locked only once they are all
//!   prepared, for the fork itself: forks on several threads at once, from inside hetmm
//!   operations or not, never wait for each other while holding it (see `prepare_all`).
//!   Last, each host's lists of regions and registered memory are locked (`Host::hold_for_fork`),
//!   so that the child finds them whole and unlocked by anyone else.
//! - child: the parent's address spaces become inert, each region's CPU side makes the child's
//!   view private (`CpuMmu::fork_child`: a private anonymous copy of private memory, read from
//!   the memfd, wherever the child has it mapped (read from `/proc/self/maps`: the program may
//!   have moved or unmapped it after the prepare); shared memory stays shared), then the child
//!   writes a byte into the pipe and closes it. Nothing of the parent's hetmm objects is ever
//!   dropped in the child (their threads live in the parent only).
//! - parent: waits until the child closed the pipe (it has its copy, or it died), bounded, then
//!   lets the waiting operations go on. So `fork()` returns in the parent only once the child's
//!   copy is taken, and no later write of the parent can reach it. glibc runs the parent
//!   handler after a failed `fork()` too: the pipe then ends at once with no byte in it, and the
//!   prepare is abandoned rather than counted as a fork (`stats.forks`, `bytes_fork_lost`).
//!
//! Forks on several threads at once, one of them from inside an operation, take turns as
//! `prepare_all` says only with glibc 2.36 or later: older glibc holds its own lock from the
//! prepare handlers to the parent and child ones, so the fork from inside the operation waits
//! for that lock while the other fork waits for the operation.
//!
//! The only `unsafe` here is the registration of the handlers.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError, Weak};
use std::time::{Duration, Instant};

use hetmm_core::error::CoreError;
use hetmm_core::{AddressSpace, ForkGuard};
use rustix::io::Errno;

use crate::host::{ForkHold, Host};

/// Why an address space could not be tracked for `fork()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForkError {
    /// `pthread_atfork` refused the handlers.
    #[error("pthread_atfork failed: error {0}")]
    Install(i32),
}

/// The longest the parent waits for the child's copy: a base plus a share per GiB of private
/// memory (the child copies at well over 1 GiB/s).
const WAIT_BASE: Duration = Duration::from_secs(30);
const WAIT_PER_GIB: Duration = Duration::from_secs(4);

/// How many times a fork is prepared before it goes ahead with changes to the program's layout
/// still unapplied (see `prepare_all`): each retry flushes device-only data again.
const PREPARE_TRIES: usize = 4;

/// The longest a prepare waits for each of a host's lists (see `Host::hold_for_fork`), and
/// from inside an operation. Their holders hold them for microseconds.
const LIST_WAIT: Duration = Duration::from_millis(500);
const LIST_WAIT_INSIDE: Duration = Duration::from_millis(2);

/// One address space with the host serving it.
#[derive(Debug, Clone)]
struct Tracked {
    space: Weak<AddressSpace>,
    host: Weak<Host>,
}

/// Every tracked address space. Locked by the prepare handler, once every address space is
/// prepared, until the parent or child handler, so no other thread holds it at the moment of
/// the fork (the child may make its own address spaces and must be able to track them). Never
/// held while a gate is waited for (see `prepare_all`): a holder only forks. A std mutex:
/// unlocking it in the child wakes waiters with a plain futex call.
static TRACKED: Mutex<Vec<Tracked>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();
/// `pthread_atfork`'s result (0: installed).
static INSTALLED: AtomicI32 = AtomicI32::new(0);
/// The errno of the last failed child-side copy in this process (0: none).
static CHILD_ERRNO: AtomicI32 = AtomicI32::new(0);
/// Bytes of hetmm memory the last fork left inaccessible in this child (see
/// [`last_child_lost_bytes`]).
static CHILD_LOST: AtomicU64 = AtomicU64::new(0);

/// What the prepare handler hands to the parent or child handler of the same fork (the same
/// thread runs them: the child's only thread is a copy of the forking one).
struct Stash {
    registry: MutexGuard<'static, Vec<Tracked>>,
    guards: Vec<ForkGuard>,
    /// Each host with its lists, locked for the fork.
    held: Vec<ForkHold>,
    /// Read end (parent) and write end (child) of the "copy taken" pipe.
    sync: Option<(OwnedFd, OwnedFd)>,
    wait: Duration,
}

thread_local! {
    static STASH: RefCell<Option<Stash>> = const { RefCell::new(None) };
}

fn registry() -> MutexGuard<'static, Vec<Tracked>> {
    TRACKED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes `fork()` of this process give children a correct view of `space`'s memory (see the
/// module notes); `host` is the CPU side serving it. Installs the `pthread_atfork` handlers
/// the first time. The space is tracked until it is dropped.
pub fn track(space: &Arc<AddressSpace>, host: &Arc<Host>) -> Result<(), ForkError> {
    INSTALL.call_once(|| {
        // SAFETY: the handlers are `extern "C" fn()` items, valid for the whole program; none
        // of them unwinds (each catches panics), and they only use state of this module.
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        INSTALLED.store(rc, Ordering::Release);
    });
    let rc = INSTALLED.load(Ordering::Acquire);
    if rc != 0 {
        return Err(ForkError::Install(rc));
    }
    let mut reg = registry();
    reg.retain(|t| t.space.strong_count() > 0);
    reg.push(Tracked { space: Arc::downgrade(space), host: Arc::downgrade(host) });
    Ok(())
}

/// In a fork child: the errno of the first failure of the last fork's copy of hetmm memory, if
/// any (the failed part is inaccessible in the child rather than shared with the parent).
pub fn last_child_error() -> Option<i32> {
    match CHILD_ERRNO.load(Ordering::Acquire) {
        0 => None,
        e => Some(e),
    }
}

/// In a fork child: bytes of private hetmm memory the last fork could not copy, which are
/// inaccessible here (touching them raises `SIGSEGV`) rather than stale or shared with the
/// parent: data only a device held that could not be copied back, and, for a fork from code
/// running inside a hetmm operation (a callback or signal handler that forks), the blocks that
/// operation (or another thread's, stopped in a fork of its own) was changing, or all of an
/// address space's private memory if other operations, or another fork, did not let go of it
/// in time (see `AddressSpace::fork_prepare`). 0 when the child has all of it.
pub fn last_child_lost_bytes() -> u64 {
    CHILD_LOST.load(Ordering::Acquire)
}

extern "C" fn prepare() {
    if std::panic::catch_unwind(prepare_all).is_err() {
        log::error!("fork: preparing hetmm memory panicked; a child may see stale or shared memory");
    }
}

fn prepare_all() {
    // The address spaces are prepared (their gates closed: this waits for operations to end)
    // before the registry is locked, never while it is: a fork from code running inside an
    // operation (its thread holds a gate; `fork_prepare` does not wait for it) may come while
    // another thread's fork is being prepared, and that prepare may be waiting for the
    // operation; had it the lock, the fork inside the operation would wait for the lock and the
    // two would wait for each other for ever. Two prepares at once each take every gate in
    // turn (see `AddressSpace::fork_prepare`: the one from inside an operation waits a bounded
    // time), then the lock, which only a prepare whose gates are closed holds: for its fork.
    let mut p = Prepared::default();
    // A fork from inside an operation prepares once: each prepare may wait its bounded time for
    // the other threads' operations again, and none applies the changes a retry waits for (the
    // thread applying them may be waiting for this one).
    let tries = if hetmm_core::fork::inside_an_operation() { 1 } else { PREPARE_TRIES };
    for attempt in 1..=tries {
        for t in snapshot() {
            p.prepare(&t);
        }
        // The program may have unmapped or moved memory of ours while the gates were closing or
        // the flush ran (another thread's munmap returns once the event is read). The core
        // applies such a change only once its gate opens: its regions would still show the old
        // layout. Open the gates to let the changes apply (`fork_prepare` settles first) and
        // prepare again, so the core's view is current. The child does not rely on it: a
        // change made after this check and before the fork itself (nothing can stop one) is
        // followed there, since the child copies the memory where the kernel has it mapped at
        // the fork, not where the regions say (`mapping::privatize_parts`).
        if !p.hosts.iter().any(|h| h.ctx.reshape_pending()) {
            break;
        }
        if attempt == tries {
            log::warn!(
                "fork: memory was being unmapped or moved while the fork was prepared; a child may see an old layout"
            );
            break;
        }
        // Not forks: each is counted again when prepared again.
        p.abandon();
    }
    // Address spaces tracked since the list was read are prepared too, without the lock; the
    // last round (spaces made without pause) under it.
    let mut round = 0;
    let registry = loop {
        let registry = registry();
        let new: Vec<Tracked> = registry.iter().filter(|t| t.space.strong_count() > 0 && !p.has(t)).cloned().collect();
        round += 1;
        if new.is_empty() || round == PREPARE_TRIES {
            for t in &new {
                p.prepare(t);
            }
            break registry;
        }
        drop(registry);
        for t in &new {
            p.prepare(t);
        }
    };
    let Prepared { guards, hosts, .. } = p;
    // Last, with every gate closed and the registry locked: nothing waits for this thread's
    // locks while holding a list (see `Host::hold_for_fork`). A fork from inside an operation
    // may come from a signal handler on a thread that holds one: it barely waits.
    let wait = if hetmm_core::fork::inside_an_operation() { LIST_WAIT_INSIDE } else { LIST_WAIT };
    let held = hosts.iter().map(|h| h.hold_for_fork(wait)).collect();
    let bytes: u64 = guards.iter().map(ForkGuard::private_bytes).sum();
    let sync = if guards.is_empty() {
        None
    } else {
        match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) {
            Ok(p) => Some(p),
            Err(e) => {
                log::warn!("fork: no pipe to wait for the child's copy ({e}); the parent will not wait");
                None
            }
        }
    };
    let wait = WAIT_BASE.saturating_add(WAIT_PER_GIB.saturating_mul(u32::try_from(bytes >> 30).unwrap_or(u32::MAX)));
    STASH.with(|s| *s.borrow_mut() = Some(Stash { registry, guards, held, sync, wait }));
}

/// The tracked address spaces, read under the registry's lock (held only for that).
fn snapshot() -> Vec<Tracked> {
    registry().iter().filter(|t| t.space.strong_count() > 0).cloned().collect()
}

/// What a prepare has done so far.
#[derive(Default)]
struct Prepared {
    guards: Vec<ForkGuard>,
    hosts: Vec<Arc<Host>>,
    /// The address spaces prepared (whatever came of it).
    seen: Vec<Weak<AddressSpace>>,
}

impl Prepared {
    fn prepare(&mut self, t: &Tracked) {
        self.seen.push(t.space.clone());
        let Some(space) = t.space.upgrade() else { return };
        if let Some(g) = space.fork_prepare() {
            self.guards.push(g);
            // Several address spaces may share a host: it is listed (and its lists locked) once.
            if let Some(h) = t.host.upgrade().filter(|h| !self.hosts.iter().any(|u| Arc::ptr_eq(u, h))) {
                self.hosts.push(h);
            }
        }
    }

    fn has(&self, t: &Tracked) -> bool {
        self.seen.iter().any(|s| s.ptr_eq(&t.space))
    }

    /// Lets go of every prepared space, to prepare them again.
    fn abandon(&mut self) {
        for g in self.guards.drain(..) {
            g.abandon();
        }
        self.hosts.clear();
        self.seen.clear();
    }
}

extern "C" fn parent() {
    let r = std::panic::catch_unwind(|| {
        let Some(stash) = STASH.with(|s| s.borrow_mut().take()) else { return };
        let Stash { registry, guards, held, sync, wait } = stash;
        let mut child = true;
        if let Some((rd, wr)) = sync {
            drop(wr);
            match wait_for_eof(&rd, wait) {
                Some(said) => child = said,
                None => log::warn!("fork: the child did not take its copy of hetmm memory within {wait:?}; going on"),
            }
        }
        for g in guards {
            if child {
                g.parent();
            } else {
                // The fork failed (no child ever had the write end): not a fork.
                g.abandon();
            }
        }
        let hosts: Vec<Arc<Host>> = held.into_iter().map(ForkHold::release).collect();
        drop(registry);
        drop(hosts);
    });
    if r.is_err() {
        log::error!("fork: resuming hetmm in the parent panicked");
    }
}

extern "C" fn child() {
    // A forked child: no logging, no unwinding out of here.
    let _ = std::panic::catch_unwind(|| {
        let Some(stash) = STASH.with(|s| s.borrow_mut().take()) else { return };
        let Stash { mut registry, mut guards, held, sync, .. } = stash;
        // Never dropped here, even if what follows panics: the lists stay locked and the hosts
        // alive (see `ForkHold::retire_in_child`).
        let held = std::mem::ManuallyDrop::new(held);
        // First of all, the byte that says a child exists (whatever becomes of it below).
        if let Some((_, wr)) = &sync {
            let _ = rustix::io::write(wr, &[1]);
        }
        CHILD_ERRNO.store(0, Ordering::Release);
        CHILD_LOST.store(guards.iter().map(ForkGuard::lost_bytes).sum(), Ordering::Release);
        for g in guards.drain(..) {
            if let Err(e) = g.child() {
                let errno = match e {
                    CoreError::Host(h) => h.errno,
                    _ => Errno::IO.raw_os_error(),
                };
                let _ = CHILD_ERRNO.compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire);
            }
        }
        // Every part is copied: what still shows a memfd is no part's, and becomes zeros.
        for h in held.iter() {
            if let Err(errno) = h.zero_leftovers_in_child() {
                let _ = CHILD_ERRNO.compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire);
            }
        }
        // Every view is the child's now: the parent's memfds and uffd can go.
        for h in held.iter() {
            h.retire_in_child();
        }
        // The parent's spaces must never be dropped here (their threads do not exist).
        std::mem::forget(guards);
        // They are the parent's: a later fork of this child has nothing to prepare for them.
        registry.clear();
        drop(registry);
        // Closing the write end tells the parent that the copy is taken.
        drop(sync);
    });
}

/// Waits until every write end of `rd`'s pipe is closed (EOF), at most `wait`. Whether any
/// byte came first (a child wrote it); `None` on timeout or error.
fn wait_for_eof(rd: &OwnedFd, wait: Duration) -> Option<bool> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 16];
    let mut said = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let ts = rustix::event::Timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ };
        let mut fds = [rustix::event::PollFd::new(rd, rustix::event::PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(Errno::INTR) => continue,
            Ok(_) => {}
            Err(_) => return None,
        }
        match rustix::io::read(rd, &mut buf) {
            Ok(0) => return Some(said),
            Ok(_) => said = true,
            Err(Errno::INTR) | Err(Errno::AGAIN) => continue,
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetmm_core::cpu::CpuFaultHandler;
    use hetmm_core::space::CoreConfig;

    /// A fresh address space and its host, tracked for forks.
    fn tracked() -> (Arc<AddressSpace>, Arc<Host>) {
        let space = AddressSpace::new(CoreConfig::default());
        let host = Host::new(Arc::downgrade(&space) as Weak<dyn CpuFaultHandler>).unwrap();
        track(&space, &host).unwrap();
        (space, host)
    }

    /// glibc runs the parent handler after a `fork()` that failed (no child): that prepare is
    /// not a fork. It was counted as one (`stats.forks`), with the bytes it found lost.
    #[test]
    fn a_fork_that_made_no_child_is_not_counted() {
        let _turn = crate::test_support::fork_turn();
        let (space, _host) = tracked();
        prepare();
        assert_eq!(space.stats().forks, 1, "prepared");
        // As after `fork()` returned -1.
        parent();
        assert_eq!(space.stats().forks, 0, "no child, no fork");
    }

    /// A fork while another thread holds the host's list of regions (a region being listed,
    /// or the list pruned) still lets the child let go of the regions' memfds: the prepare
    /// waits for the list and holds it through the fork. The child only tried the lock before,
    /// and kept every memfd when another thread had held the list at the fork.
    #[test]
    fn a_fork_while_a_list_is_held_still_retires_the_childs_memfds() {
        use std::os::unix::fs::MetadataExt;
        let _turn = crate::test_support::fork_turn();
        let memfds = || -> Vec<(i32, u64)> {
            let dir = std::fs::read_dir("/proc/self/fd").unwrap();
            dir.filter_map(|e| {
                let fd: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
                let ino = std::fs::metadata(format!("/proc/self/fd/{fd}")).ok()?.ino();
                link.to_str()?.starts_with("/memfd:hetmm").then_some((fd, ino))
            })
            .collect()
        };
        let (_space, host) = tracked();
        let region = host.create_region(2 << 20).unwrap();
        // The region's own memfd, by inode: new memfds of tests running beside this one (not
        // this host's) were taken for its own, and one the child kept failed this test.
        let ino = region.file().ino;
        let ours: Vec<(i32, u64)> = memfds().into_iter().filter(|&(_, i)| i == ino).collect();
        assert!(!ours.is_empty(), "the region's memfd is open");
        let (tx, rx) = std::sync::mpsc::channel();
        let lists = host.ctx.regions.clone();
        let holder = std::thread::spawn(move || {
            let held = lists.lock();
            tx.send(()).unwrap();
            // Well inside the prepare's wait for a list (`LIST_WAIT`).
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
        });
        rx.recv().unwrap();
        // SAFETY: the child calls only `fstat` and `_exit` (async-signal-safe) on memory it
        // has, and never returns into the test harness.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let kept = ours.iter().any(|&(fd, ino)| {
                // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: `st` is a live local of the right type; `fd` is any descriptor.
                unsafe { libc::fstat(fd, &mut st) == 0 && st.st_ino == ino }
            });
            // SAFETY: ends the child at once, as a fork child should.
            unsafe { libc::_exit(i32::from(kept)) };
        }
        assert!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
        let mut status = 0;
        // SAFETY: waits for this test's own child, into a live local.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        holder.join().unwrap();
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child kept the region's memfd ({status:#x})"
        );
        assert!(memfds().iter().any(|f| ours.contains(f)), "the parent keeps it");
        drop(region);
    }

    /// A fork by a thread that holds one of the lists itself (from a signal handler that
    /// interrupted it there) waits a bounded time for it, then forks: the child only tries the
    /// list. The prepare waited for the list for ever at first, with every gate closed.
    #[test]
    fn a_fork_by_the_thread_holding_a_list_is_not_stuck() {
        let _turn = crate::test_support::fork_turn();
        let (_space, host) = tracked();
        let region = host.create_region(2 << 20).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lists = host.ctx.mirrors.clone();
        let forker = std::thread::spawn(move || {
            let held = lists.lock();
            // SAFETY: the child only calls `_exit`.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(0) };
            }
            drop(held);
            let mut status = 0;
            // SAFETY: waits for this thread's own child, into a live local.
            let waited = pid > 0 && unsafe { libc::waitpid(pid, &mut status, 0) } == pid;
            tx.send(waited && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0).unwrap();
        });
        let done = rx.recv_timeout(Duration::from_secs(60));
        assert_eq!(done, Ok(true), "the fork came back and its child exited");
        forker.join().unwrap();
        drop(region);
    }
}
