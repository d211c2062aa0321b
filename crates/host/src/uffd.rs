//! An owned userfaultfd and its ioctls.
//!
//! Structs and most constants come from `linux_raw_sys::general`; the few that old headers lack
//! (mode bits of CONTINUE/WRITEPROTECT/POISON, `USERFAULTFD_IOC_NEW`) are defined here. Every
//! `unsafe` of the crate that talks to the uffd lives in this module, behind [`Uffd`]'s safe
//! methods: the fd is owned, each ioctl is paired with its struct in exactly one place, and range
//! ioctls can only fill or drop page-table entries of registered ranges. Registering a range is
//! the one `unsafe` method ([`Uffd::register`]): from then on the handle decides what the range's
//! missing pages hold, so its caller must own the range's contents.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bitflags::bitflags;
use hetmm_core::types::VaRange;
use linux_raw_sys::general as sys;
use rustix::io::Errno;
use rustix::ioctl::{self, opcode, Ioctl, IoctlOutput, Opcode, Updater};

pub use sys::uffd_msg;

/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: Opcode = 0xAA00;
const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

// Opcodes. `UFFDIO_UNREGISTER`/`WAKE` are `_IOR` in the header although the kernel only reads
// the struct; the values are checked against linux-raw-sys's table in the tests.
const OP_API: Opcode = opcode::read_write::<sys::uffdio_api>(0xAA, sys::_UFFDIO_API as u8);
const OP_REGISTER: Opcode = opcode::read_write::<sys::uffdio_register>(0xAA, sys::_UFFDIO_REGISTER as u8);
const OP_UNREGISTER: Opcode = opcode::read::<sys::uffdio_range>(0xAA, sys::_UFFDIO_UNREGISTER as u8);
const OP_WAKE: Opcode = opcode::read::<sys::uffdio_range>(0xAA, sys::_UFFDIO_WAKE as u8);
const OP_COPY: Opcode = opcode::read_write::<sys::uffdio_copy>(0xAA, sys::_UFFDIO_COPY as u8);
const OP_WRITEPROTECT: Opcode = opcode::read_write::<sys::uffdio_writeprotect>(0xAA, sys::_UFFDIO_WRITEPROTECT as u8);
const OP_CONTINUE: Opcode = opcode::read_write::<sys::uffdio_continue>(0xAA, sys::_UFFDIO_CONTINUE as u8);
const OP_POISON: Opcode = opcode::read_write::<sys::uffdio_poison>(0xAA, sys::_UFFDIO_POISON as u8);

/// What the kernel reports available, less what this process may not ask for: the kernel lists
/// `EVENT_FORK` to everyone but refuses a handshake asking for it with `EPERM` unless the caller
/// has `CAP_SYS_PTRACE` (`userfaultfd_api`).
fn usable(reported: Features) -> Features {
    let ptrace = rustix::thread::capabilities(None)
        .is_ok_and(|c| c.effective.contains(rustix::thread::CapabilitySet::SYS_PTRACE));
    if ptrace {
        reported
    } else {
        reported.difference(Features::EVENT_FORK)
    }
}

bitflags! {
    /// `UFFD_FEATURE_*` bits (what `UFFDIO_API` granted).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Features: u64 {
        /// WP faults are reported with `UFFD_PAGEFAULT_FLAG_WP`.
        const PAGEFAULT_FLAG_WP = sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
        /// fork() events (non-cooperative; not requested: hetmm follows forks with `pthread_atfork`,
        /// and the kernel grants this only to callers with `CAP_SYS_PTRACE`).
        const EVENT_FORK = sys::UFFD_FEATURE_EVENT_FORK as u64;
        /// mremap() events.
        const EVENT_REMAP = sys::UFFD_FEATURE_EVENT_REMAP as u64;
        /// MADV_DONTNEED/REMOVE events (they make madvise wait until the event is read).
        const EVENT_REMOVE = sys::UFFD_FEATURE_EVENT_REMOVE as u64;
        /// MISSING mode on hugetlbfs.
        const MISSING_HUGETLBFS = sys::UFFD_FEATURE_MISSING_HUGETLBFS as u64;
        /// MISSING mode on shmem/memfd.
        const MISSING_SHMEM = sys::UFFD_FEATURE_MISSING_SHMEM as u64;
        /// munmap() events.
        const EVENT_UNMAP = sys::UFFD_FEATURE_EVENT_UNMAP as u64;
        /// Faults raise SIGBUS instead of events.
        const SIGBUS = sys::UFFD_FEATURE_SIGBUS as u64;
        /// Messages carry the faulting thread id.
        const THREAD_ID = sys::UFFD_FEATURE_THREAD_ID as u64;
        /// MINOR mode on hugetlbfs.
        const MINOR_HUGETLBFS = sys::UFFD_FEATURE_MINOR_HUGETLBFS as u64;
        /// MINOR mode on shmem/memfd.
        const MINOR_SHMEM = sys::UFFD_FEATURE_MINOR_SHMEM as u64;
        /// Fault addresses are not masked to the page.
        const EXACT_ADDRESS = sys::UFFD_FEATURE_EXACT_ADDRESS as u64;
        /// WP mode on shmem/hugetlbfs.
        const WP_HUGETLBFS_SHMEM = sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
        /// WP applies to unpopulated anonymous PTEs.
        const WP_UNPOPULATED = sys::UFFD_FEATURE_WP_UNPOPULATED as u64;
        /// `UFFDIO_POISON`.
        const POISON = sys::UFFD_FEATURE_POISON as u64;
        /// The kernel resolves WP faults itself.
        const WP_ASYNC = sys::UFFD_FEATURE_WP_ASYNC as u64;
        /// `UFFDIO_MOVE`.
        const MOVE = sys::UFFD_FEATURE_MOVE as u64;
        /// Bits this crate does not know by name.
        const _ = !0;
    }
}

impl Features {
    /// What a shared region (memfd, MISSING|MINOR|WP) cannot work without. `POISON` (Linux
    /// 6.6) releases a thread whose fault cannot be served with SIGBUS: without it the thread
    /// could only be woken to fault again, for as long as the fault failed. Requiring it also
    /// rules out kernels without `UFFDIO_CONTINUE_MODE_WP` (6.4, no feature bit of its own),
    /// where every read-only CPU mapping would fail.
    pub const REQUIRED: Features = Features::MISSING_SHMEM
        .union(Features::MINOR_SHMEM)
        .union(Features::WP_HUGETLBFS_SHMEM)
        .union(Features::PAGEFAULT_FLAG_WP)
        .union(Features::POISON);
    /// Requested when the kernel has them. With the EVENT_* bits the kernel blocks
    /// madvise/munmap/mremap until the event is read, so only the reader thread may read the uffd
    /// and it never zaps or maps memory itself (see `crate::host`).
    pub const OPTIONAL: Features =
        Features::THREAD_ID.union(Features::EVENT_REMOVE).union(Features::EVENT_UNMAP).union(Features::EVENT_REMAP);
}

bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RegisterMode: u64 {
        /// Fault when no page exists.
        const MISSING = sys::UFFDIO_REGISTER_MODE_MISSING as u64;
        /// Fault on writes to write-protected PTEs.
        const WP = sys::UFFDIO_REGISTER_MODE_WP as u64;
        /// Fault when the page exists but the PTE does not.
        const MINOR = sys::UFFDIO_REGISTER_MODE_MINOR as u64;
    }
}

bitflags! {
    /// Range ioctls a registration allows (`1 << _UFFDIO_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << sys::_UFFDIO_WAKE;
        /// `UFFDIO_COPY`.
        const COPY = 1 << sys::_UFFDIO_COPY;
        /// `UFFDIO_ZEROPAGE`.
        const ZEROPAGE = 1 << sys::_UFFDIO_ZEROPAGE;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << sys::_UFFDIO_MOVE;
        /// `UFFDIO_WRITEPROTECT`.
        const WRITEPROTECT = 1 << sys::_UFFDIO_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`.
        const CONTINUE = 1 << sys::_UFFDIO_CONTINUE;
        /// `UFFDIO_POISON`.
        const POISON = 1 << sys::_UFFDIO_POISON;
        /// Bits this crate does not know by name.
        const _ = !0;
    }
}

/// Why a uffd could not be opened or initialised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Neither `/dev/userfaultfd` nor the syscall gave a uffd.
    #[error("cannot open a userfaultfd (/dev/userfaultfd: errno {dev}, userfaultfd(2): errno {syscall}); need access to /dev/userfaultfd, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1")]
    Unavailable {
        /// Errno of the `/dev/userfaultfd` path.
        dev: i32,
        /// Errno of the syscall path.
        syscall: i32,
    },
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake failed: errno {0}")]
    Api(i32),
    /// The kernel lacks features a shared region needs.
    #[error("kernel lacks userfaultfd features {missing:?} (has {available:?})")]
    MissingFeatures {
        /// Required and absent.
        missing: Features,
        /// What the kernel offers.
        available: Features,
    },
}

/// A failed range ioctl. Every variant names the operation and the range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UffdError {
    /// Part of the range was handled (`done` bytes from its start), then the ioctl stopped.
    #[error("uffd {op} on {range}: {done} bytes done, then errno {errno}")]
    Partial {
        /// Operation.
        op: &'static str,
        /// Range asked for.
        range: VaRange,
        /// Bytes handled from the range's start.
        done: u64,
        /// Errno the ioctl returned (EAGAIN for partial progress).
        errno: i32,
    },
    /// The first page already has a PTE (someone else resolved it). Nobody was woken.
    #[error("uffd {op} on {range}: page already mapped (EEXIST)")]
    Exists {
        /// Operation.
        op: &'static str,
        /// Range asked for.
        range: VaRange,
    },
    /// The address space is changing (an event is pending) or the kernel asked to retry.
    #[error("uffd {op} on {range}: retry (EAGAIN)")]
    Retry {
        /// Operation.
        op: &'static str,
        /// Range asked for.
        range: VaRange,
    },
    /// The range or the process is gone (ENOENT / ESRCH).
    #[error("uffd {op} on {range}: target gone (errno {errno})")]
    Gone {
        /// Operation.
        op: &'static str,
        /// Range asked for.
        range: VaRange,
        /// ENOENT or ESRCH.
        errno: i32,
    },
    /// Any other failure.
    #[error("uffd {op} on {range}: errno {errno}")]
    Os {
        /// Operation.
        op: &'static str,
        /// Range asked for.
        range: VaRange,
        /// The errno.
        errno: i32,
    },
    /// The registration does not allow the ioctls this crate needs.
    #[error("uffd register on {range}: kernel allows only ioctls {got:?}, need {need:?}")]
    Unsupported {
        /// Range registered.
        range: VaRange,
        /// Ioctls needed.
        need: Ioctls,
        /// Ioctls allowed.
        got: Ioctls,
    },
}

impl UffdError {
    /// The OS error number behind the error (EINVAL for [`UffdError::Unsupported`]).
    pub fn errno(&self) -> i32 {
        match self {
            UffdError::Partial { errno, .. } | UffdError::Gone { errno, .. } | UffdError::Os { errno, .. } => *errno,
            UffdError::Exists { .. } => Errno::EXIST.raw_os_error(),
            UffdError::Retry { .. } => Errno::AGAIN.raw_os_error(),
            UffdError::Unsupported { .. } => Errno::INVAL.raw_os_error(),
        }
    }

    /// Classifies a failed ioctl from its errno and its progress field (`done` bytes > 0 means
    /// partial progress; the kernel stores a negated errno there otherwise).
    fn classify(op: &'static str, range: VaRange, e: Errno, progress: i64) -> Self {
        if progress > 0 && (progress as u64) < range.len {
            return UffdError::Partial { op, range, done: progress as u64, errno: e.raw_os_error() };
        }
        match e {
            Errno::EXIST => UffdError::Exists { op, range },
            Errno::AGAIN => UffdError::Retry { op, range },
            Errno::NOENT | Errno::SRCH => UffdError::Gone { op, range, errno: e.raw_os_error() },
            _ => UffdError::Os { op, range, errno: e.raw_os_error() },
        }
    }
}

/// A decoded uffd message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `addr` (`UFFD_PAGEFAULT_FLAG_*` in `flags`; `tid` if THREAD_ID).
    Pagefault {
        /// Faulting address (page aligned unless EXACT_ADDRESS).
        addr: u64,
        /// `UFFD_PAGEFAULT_FLAG_WRITE | _WP | _MINOR`.
        flags: u64,
        /// Faulting thread id, 0 when the feature is off.
        tid: u32,
    },
    /// fork(): the child's uffd.
    Fork {
        /// The new uffd's number in this process.
        ufd: u32,
    },
    /// mremap().
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// MADV_DONTNEED / MADV_REMOVE of `[start, end)`.
    Remove {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// munmap() of `[start, end)`.
    Unmap {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// An event number this crate does not know.
    Unknown(u8),
}

/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const PAGEFAULT_FLAG_WRITE: u64 = sys::UFFD_PAGEFAULT_FLAG_WRITE as u64;
/// `UFFD_PAGEFAULT_FLAG_WP`.
pub const PAGEFAULT_FLAG_WP: u64 = sys::UFFD_PAGEFAULT_FLAG_WP as u64;
/// `UFFD_PAGEFAULT_FLAG_MINOR`.
pub const PAGEFAULT_FLAG_MINOR: u64 = sys::UFFD_PAGEFAULT_FLAG_MINOR as u64;

/// A zeroed message buffer for [`Uffd::read_msgs`].
pub fn empty_msg() -> uffd_msg {
    // SAFETY: `uffd_msg` is plain integers and unions of plain integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Decodes one message read by [`Uffd::read_msgs`].
pub fn decode(m: &uffd_msg) -> Event {
    // SAFETY (all union reads below): every member of `uffd_msg.arg` is plain integers, so any
    // bit pattern is a valid value; `event` says which member the kernel filled.
    match m.event as u32 {
        sys::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: see above.
            let pf = unsafe { m.arg.pagefault };
            // SAFETY: see above (`ptid` is a u32, zero when THREAD_ID is off).
            let tid = unsafe { pf.feat.ptid };
            Event::Pagefault { addr: pf.address, flags: pf.flags, tid }
        }
        sys::UFFD_EVENT_FORK => {
            // SAFETY: see above.
            let f = unsafe { m.arg.fork };
            Event::Fork { ufd: f.ufd }
        }
        sys::UFFD_EVENT_REMAP => {
            // SAFETY: see above.
            let r = unsafe { m.arg.remap };
            Event::Remap { from: r.from, to: r.to, len: r.len }
        }
        sys::UFFD_EVENT_REMOVE => {
            // SAFETY: see above.
            let r = unsafe { m.arg.remove };
            Event::Remove { start: r.start, end: r.end }
        }
        sys::UFFD_EVENT_UNMAP => {
            // SAFETY: see above (UNMAP uses the `remove` layout).
            let r = unsafe { m.arg.remove };
            Event::Unmap { start: r.start, end: r.end }
        }
        other => Event::Unknown(other as u8),
    }
}

/// `ioctl(USERFAULTFD_IOC_NEW, flags)` on `/dev/userfaultfd`; its return value is the new fd.
struct IocNew(u32);

// SAFETY: USERFAULTFD_IOC_NEW takes its flags as the integer argument (no pointer), writes no
// user memory, and returns a new fd on success, which `output_from_ptr` passes through.
unsafe impl Ioctl for IocNew {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        USERFAULTFD_IOC_NEW
    }
    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        self.0 as usize as *mut std::ffi::c_void
    }
    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut std::ffi::c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

static USER_MODE_WARNED: AtomicBool = AtomicBool::new(false);

/// An owned, initialised userfaultfd (non-blocking, close-on-exec).
///
/// A uffd acts on the address space of the process that opened it, even from a `fork()` child
/// that inherited the fd: its ioctls there would register, map or protect the *parent's*
/// memory. So every ioctl checks that it is issued by the opening process, and fails with
/// [`UffdError::Gone`] (ESRCH) in a child.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    kernel_faults: bool,
    owner: rustix::process::Pid,
}

impl Uffd {
    /// Opens a uffd and performs the `UFFDIO_API` handshake, requesting `required` (failing if
    /// the kernel lacks any) plus whatever of `optional` it has.
    pub fn open(required: Features, optional: Features) -> Result<Uffd, OpenError> {
        // UFFDIO_API may be issued once per fd, so learn what the kernel offers on a throwaway
        // uffd (asking for nothing), then request exactly what we want on the real one.
        let (probe, _) = open_fd()?;
        let available = usable(Features::from_bits_retain(api(&probe, 0).map_err(OpenError::Api)?));
        drop(probe);
        let missing = required.difference(available);
        if !missing.is_empty() {
            return Err(OpenError::MissingFeatures { missing, available });
        }
        let want = required | (optional & available);
        let (fd, kernel_faults) = open_fd()?;
        api(&fd, want.bits()).map_err(OpenError::Api)?;
        Ok(Uffd { fd, features: want, kernel_faults, owner: rustix::process::getpid() })
    }

    /// The process that opened the uffd (whose address space it acts on).
    pub fn owner(&self) -> rustix::process::Pid {
        self.owner
    }

    /// The features granted by the handshake.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Whether faults taken in kernel mode (`read(2)` into a registered page, GUP) reach this
    /// uffd. False when only `UFFD_USER_MODE_ONLY` was permitted: such accesses then fail.
    pub fn kernel_faults_supported(&self) -> bool {
        self.kernel_faults
    }

    /// Waits up to `timeout` for messages. `Ok(true)` when readable.
    pub fn poll(&self, timeout: Duration) -> Result<bool, Errno> {
        // Saturate: `as` would wrap a timeout past i64::MAX seconds (`Duration::MAX`) to a
        // negative `tv_sec`, which the kernel refuses with EINVAL.
        let secs = timeout.as_secs().min(i64::MAX as u64);
        let ts = rustix::event::Timespec { tv_sec: secs as _, tv_nsec: timeout.subsec_nanos() as _ };
        let mut fds = [rustix::event::PollFd::new(&self.fd, rustix::event::PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) => Ok(n > 0),
            Err(Errno::INTR) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads as many whole messages as fit into `buf`; 0 when none is pending.
    pub fn read_msgs(&self, buf: &mut [uffd_msg]) -> Result<usize, Errno> {
        let size = std::mem::size_of::<uffd_msg>();
        // `uffd_msg` is plain old data: any bytes read into it make a valid value.
        // SAFETY: `bytes` spans exactly `buf`'s memory (POD, above), mutably borrowed meanwhile.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(buf)) };
        match rustix::io::read(&self.fd, bytes) {
            Ok(n) => Ok(n / size),
            Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Registers `range` in `mode` and checks that the ioctls the mode needs are allowed.
    ///
    /// # Safety
    ///
    /// While `range` is registered, this handle decides what its missing pages hold
    /// ([`Uffd::copy`], [`Uffd::cont`]), whether a page raises `SIGBUS` ([`Uffd::poison`]) and
    /// whether an access waits for a reply: the caller must own the contents of `range` (memory
    /// it mapped to serve through this handle, or memory it replaced with such a mapping holding
    /// the same bytes), not memory other code, or a Rust reference, relies on holding particular
    /// bytes. Those other methods are safe because they act only on ranges registered here.
    pub unsafe fn register(&self, range: VaRange, mode: RegisterMode) -> Result<Ioctls, UffdError> {
        let mut arg = sys::uffdio_register { range: raw_range(range), mode: mode.bits(), ioctls: 0 };
        // SAFETY: OP_REGISTER takes a `uffdio_register`.
        unsafe { self.call::<OP_REGISTER, _>(&mut arg) }.map_err(|e| UffdError::classify("register", range, e, 0))?;
        let got = Ioctls::from_bits_retain(arg.ioctls);
        let mut need = Ioctls::WAKE;
        if mode.contains(RegisterMode::MINOR) {
            need |= Ioctls::CONTINUE;
        }
        if mode.contains(RegisterMode::WP) {
            need |= Ioctls::WRITEPROTECT;
        }
        if mode.contains(RegisterMode::MISSING) {
            need |= Ioctls::COPY;
        }
        if !got.contains(need) {
            let _ = self.unregister(range);
            return Err(UffdError::Unsupported { range, need, got });
        }
        Ok(got)
    }

    /// Unregisters `range`.
    pub fn unregister(&self, range: VaRange) -> Result<(), UffdError> {
        let mut arg = raw_range(range);
        // SAFETY: OP_UNREGISTER takes a `uffdio_range`.
        unsafe { self.call::<OP_UNREGISTER, _>(&mut arg) }.map_err(|e| UffdError::classify("unregister", range, e, 0))
    }

    /// Wakes threads waiting on faults in `range` (they retry the access).
    pub fn wake(&self, range: VaRange) -> Result<(), UffdError> {
        let mut arg = raw_range(range);
        // SAFETY: OP_WAKE takes a `uffdio_range`.
        unsafe { self.call::<OP_WAKE, _>(&mut arg) }.map_err(|e| UffdError::classify("wake", range, e, 0))
    }

    /// `UFFDIO_CONTINUE`: maps the existing page-cache pages of `range` (MINOR mode), write
    /// protected if `wp`, and wakes the waiters of the mapped part unless `!wake`.
    pub fn cont(&self, range: VaRange, wp: bool, wake: bool) -> Result<(), UffdError> {
        let mut mode = 0;
        if wp {
            mode |= UFFDIO_CONTINUE_MODE_WP;
        }
        if !wake {
            mode |= UFFDIO_CONTINUE_MODE_DONTWAKE;
        }
        let mut arg = sys::uffdio_continue { range: raw_range(range), mode, mapped: 0 };
        // SAFETY: OP_CONTINUE takes a `uffdio_continue`.
        unsafe { self.call::<OP_CONTINUE, _>(&mut arg) }
            .map_err(|e| UffdError::classify("continue", range, e, arg.mapped))
    }

    /// `UFFDIO_WRITEPROTECT`: protects (`protect`) or unprotects the present PTEs of `range`;
    /// unprotecting wakes the waiters unless `!wake`. Protecting never wakes anyone, and `wake`
    /// is then ignored: the kernel refuses `MODE_WP | MODE_DONTWAKE` with EINVAL.
    pub fn writeprotect(&self, range: VaRange, protect: bool, wake: bool) -> Result<(), UffdError> {
        let mode = if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else if wake {
            0
        } else {
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        };
        let mut arg = sys::uffdio_writeprotect { range: raw_range(range), mode };
        // SAFETY: OP_WRITEPROTECT takes a `uffdio_writeprotect`.
        unsafe { self.call::<OP_WRITEPROTECT, _>(&mut arg) }
            .map_err(|e| UffdError::classify("writeprotect", range, e, 0))
    }

    /// `UFFDIO_COPY`: fills the missing pages at `dst` with a copy of `src` (page multiple) and
    /// wakes the waiters. Only fills holes (EEXIST otherwise), so it never overwrites data.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<(), UffdError> {
        let range = VaRange::new(dst, src.len() as u64);
        let mut arg = sys::uffdio_copy { dst, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
        // SAFETY: OP_COPY takes a `uffdio_copy`; the kernel only reads `src`, which is borrowed
        // for the call, and writes only fresh pages of the registered `dst` range.
        unsafe { self.call::<OP_COPY, _>(&mut arg) }.map_err(|e| UffdError::classify("copy", range, e, arg.copy))
    }

    /// `UFFDIO_POISON`: later accesses to `range` raise SIGBUS; waiters are woken (and get it).
    pub fn poison(&self, range: VaRange) -> Result<(), UffdError> {
        let mut arg = sys::uffdio_poison { range: raw_range(range), mode: 0, updated: 0 };
        // SAFETY: OP_POISON takes a `uffdio_poison`.
        unsafe { self.call::<OP_POISON, _>(&mut arg) }.map_err(|e| UffdError::classify("poison", range, e, arg.updated))
    }

    /// Issues one uffd ioctl.
    ///
    /// # Safety
    ///
    /// `OP` must be the uffd ioctl whose argument is a `T`.
    unsafe fn call<const OP: Opcode, T>(&self, arg: &mut T) -> Result<(), Errno> {
        // In a fork child the uffd still describes the parent's address space.
        if rustix::process::getpid() != self.owner {
            return Err(Errno::SRCH);
        }
        // SAFETY: the caller pairs `OP` with its struct; `arg` is borrowed for the call.
        unsafe { ioctl::ioctl(&self.fd, Updater::<OP, T>::new(arg)) }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn raw_range(r: VaRange) -> sys::uffdio_range {
    sys::uffdio_range { start: r.start, len: r.len }
}

/// `UFFDIO_API` on a fresh fd; returns the features field the kernel wrote back.
fn api(fd: &OwnedFd, features: u64) -> Result<u64, i32> {
    let mut arg = sys::uffdio_api { api: sys::UFFD_API as u64, features, ioctls: 0 };
    // SAFETY: OP_API takes a `uffdio_api`, borrowed for the call.
    unsafe { ioctl::ioctl(fd, Updater::<OP_API, _>::new(&mut arg)) }.map_err(|e| e.raw_os_error())?;
    Ok(arg.features)
}

/// Opens a raw uffd: `/dev/userfaultfd` first (it can always trap kernel-mode faults), then the
/// syscall, then the syscall in user-mode-only mode. Returns the fd and whether kernel-mode
/// faults are trapped.
fn open_fd() -> Result<(OwnedFd, bool), OpenError> {
    let flags = sys::O_CLOEXEC | sys::O_NONBLOCK;
    let dev = match rustix::fs::open(
        "/dev/userfaultfd",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        // SAFETY: IocNew is USERFAULTFD_IOC_NEW with its integer flags argument.
        Ok(dev) => match unsafe { ioctl::ioctl(&dev, IocNew(flags)) } {
            // SAFETY: on success the ioctl returns a new fd that nothing else owns.
            Ok(raw) => return Ok((unsafe { OwnedFd::from_raw_fd(raw) }, true)),
            Err(e) => e,
        },
        Err(e) => e,
    };
    let sys_flags = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
    // SAFETY: creating a uffd has no memory-safety preconditions; the fd is returned owned.
    let full = unsafe { rustix::mm::userfaultfd(sys_flags) };
    match full {
        Ok(fd) => Ok((fd, true)),
        Err(Errno::PERM) => {
            let user_only = sys_flags | rustix::mm::UserfaultfdFlags::from_bits_retain(sys::UFFD_USER_MODE_ONLY);
            // SAFETY: as above.
            match unsafe { rustix::mm::userfaultfd(user_only) } {
                Ok(fd) => {
                    if !USER_MODE_WARNED.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "userfaultfd: only UFFD_USER_MODE_ONLY is permitted; kernel-mode \
                             accesses (read(2), O_DIRECT, pinning) to device-resident memory \
                             will fail. Grant access to /dev/userfaultfd to fix this."
                        );
                    }
                    Ok((fd, false))
                }
                Err(e) => Err(OpenError::Unavailable { dev: dev.raw_os_error(), syscall: e.raw_os_error() }),
            }
        }
        Err(e) => Err(OpenError::Unavailable { dev: dev.raw_os_error(), syscall: e.raw_os_error() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_raw_sys::ioctl as nr;

    #[test]
    fn opcodes_match_kernel_table() {
        assert_eq!(OP_API, nr::UFFDIO_API as Opcode);
        assert_eq!(OP_REGISTER, nr::UFFDIO_REGISTER as Opcode);
        assert_eq!(OP_UNREGISTER, nr::UFFDIO_UNREGISTER as Opcode);
        assert_eq!(OP_WAKE, nr::UFFDIO_WAKE as Opcode);
        assert_eq!(OP_COPY, nr::UFFDIO_COPY as Opcode);
        assert_eq!(OP_WRITEPROTECT, nr::UFFDIO_WRITEPROTECT as Opcode);
        assert_eq!(OP_CONTINUE, nr::UFFDIO_CONTINUE as Opcode);
        assert_eq!(OP_POISON, 0xc020aa08);
        assert_eq!(std::mem::size_of::<uffd_msg>(), 32);
    }

    #[test]
    fn opens_and_reports_features() {
        let u = Uffd::open(Features::REQUIRED, Features::OPTIONAL).expect("open uffd");
        assert!(u.features().contains(Features::REQUIRED));
        assert!(!u.features().contains(Features::EVENT_FORK));
        // Nothing is pending on a fresh uffd.
        let mut buf = [empty_msg(); 4];
        assert_eq!(u.read_msgs(&mut buf), Ok(0));
        assert_eq!(u.poll(Duration::from_millis(1)), Ok(false));
    }

    #[test]
    fn event_fork_is_usable_only_with_ptrace_capability() {
        let caps = rustix::thread::capabilities(None).expect("capget");
        let ptrace = caps.effective.contains(rustix::thread::CapabilitySet::SYS_PTRACE);
        let all = Features::EVENT_FORK | Features::MISSING_SHMEM;
        assert_eq!(usable(all).contains(Features::EVENT_FORK), ptrace);
        assert!(usable(all).contains(Features::MISSING_SHMEM));
        // A thread without the capability (credentials are per thread): the kernel refuses the
        // handshake asking for it, and `usable` no longer offers it.
        std::thread::spawn(|| {
            let mut caps = rustix::thread::capabilities(None).expect("capget");
            caps.effective.remove(rustix::thread::CapabilitySet::SYS_PTRACE);
            rustix::thread::set_capabilities(None, caps).expect("capset dropping a capability");
            let (fd, _) = open_fd().expect("open uffd");
            assert_eq!(api(&fd, Features::EVENT_FORK.bits()), Err(Errno::PERM.raw_os_error()));
            assert!(!usable(Features::EVENT_FORK).contains(Features::EVENT_FORK));
        })
        .join()
        .expect("the thread without CAP_SYS_PTRACE");
    }

    #[test]
    fn errors_keep_progress_and_kind() {
        let r = VaRange::new(0x1000, 0x3000);
        assert_eq!(
            UffdError::classify("continue", r, Errno::AGAIN, 0x1000),
            UffdError::Partial { op: "continue", range: r, done: 0x1000, errno: 11 }
        );
        assert_eq!(
            UffdError::classify("continue", r, Errno::EXIST, -17),
            UffdError::Exists { op: "continue", range: r }
        );
        assert_eq!(UffdError::classify("copy", r, Errno::AGAIN, 0), UffdError::Retry { op: "copy", range: r });
        assert!(matches!(UffdError::classify("copy", r, Errno::SRCH, 0), UffdError::Gone { errno: 3, .. }));
        let msg = UffdError::classify("wake", r, Errno::INVAL, 0).to_string();
        assert!(msg.contains("[0x1000, 0x4000)"), "{msg}");
    }

    #[test]
    fn bad_range_is_an_error_not_a_panic() {
        let u = Uffd::open(Features::REQUIRED, Features::OPTIONAL).expect("open uffd");
        let r = VaRange::new(0x1001, 0x1000);
        assert!(matches!(u.wake(r), Err(UffdError::Os { errno: 22, .. })));
        // SAFETY: refused (the range is not page aligned): nothing is registered.
        assert!(unsafe { u.register(r, RegisterMode::MISSING) }.is_err());
    }

    /// Protecting with `wake = false` used to send `MODE_WP | MODE_DONTWAKE`, which the kernel
    /// refuses (EINVAL): every read-only CPU mapping over pages already present failed that way.
    #[test]
    fn writeprotect_with_or_without_wake() {
        let m = crate::mapping::SharedMapping::new(4 * hetmm_core::types::PAGE_SIZE).unwrap();
        m.write_backing(0, &[1u8; 4 * hetmm_core::types::PAGE_SIZE as usize]).unwrap();
        let u = Uffd::open(Features::REQUIRED, Features::empty()).expect("open uffd");
        let r = m.app_range();
        // SAFETY: the view of the test's own mapping, which the test serves.
        unsafe { u.register(r, RegisterMode::MISSING | RegisterMode::MINOR | RegisterMode::WP) }.unwrap();
        u.cont(r, false, false).unwrap();
        for (protect, wake) in [(true, false), (false, false), (true, true), (false, true)] {
            u.writeprotect(r, protect, wake).unwrap_or_else(|e| panic!("protect {protect} wake {wake}: {e}"));
        }
        assert_eq!(m.touch_app(r.start).unwrap(), 1);
    }

    /// A poll timeout past `i64::MAX` seconds (`Duration::MAX`, "wait forever") must not wrap
    /// to a negative `tv_sec`, which the kernel refuses with EINVAL even with a message pending.
    #[test]
    fn poll_with_huge_timeout_sees_a_pending_fault() {
        let m = crate::mapping::SharedMapping::new(hetmm_core::types::PAGE_SIZE).unwrap();
        let u = Uffd::open(Features::REQUIRED, Features::empty()).expect("open uffd");
        let r = m.app_range();
        // SAFETY: the view of the test's own mapping, which the test serves.
        unsafe { u.register(r, RegisterMode::MISSING) }.unwrap();
        let addr = r.start;
        std::thread::scope(|s| {
            // SAFETY: `addr` is the first byte of the mapping's view, mapped while `m` lives.
            let t = s.spawn(move || unsafe { std::ptr::read_volatile(addr as *const u8) });
            while !u.poll(Duration::from_millis(10)).unwrap() {}
            let got = u.poll(Duration::MAX);
            // Release the toucher whatever happened above.
            let page = vec![3u8; hetmm_core::types::PAGE_SIZE as usize];
            u.copy(addr, &page).unwrap();
            assert_eq!(t.join().unwrap(), 3);
            assert_eq!(got, Ok(true));
        });
    }

    /// CONTINUE stopping at an already-mapped page reports the bytes done before it (EAGAIN),
    /// and the next call from there reports EEXIST.
    #[test]
    fn continue_reports_partial_progress_then_exists() {
        let ps = hetmm_core::types::PAGE_SIZE;
        let m = crate::mapping::SharedMapping::new(3 * ps).unwrap();
        m.write_backing(0, &vec![1u8; 3 * ps as usize]).unwrap();
        let u = Uffd::open(Features::REQUIRED, Features::empty()).expect("open uffd");
        let r = m.app_range();
        // SAFETY: the view of the test's own mapping, which the test serves.
        unsafe { u.register(r, RegisterMode::MISSING | RegisterMode::MINOR) }.unwrap();
        u.cont(VaRange::new(r.start + ps, ps), false, true).unwrap();
        assert_eq!(
            u.cont(r, false, true),
            Err(UffdError::Partial { op: "continue", range: r, done: ps, errno: Errno::AGAIN.raw_os_error() })
        );
        let rest = VaRange::new(r.start + ps, 2 * ps);
        assert_eq!(u.cont(rest, false, true), Err(UffdError::Exists { op: "continue", range: rest }));
        u.cont(VaRange::new(r.start + 2 * ps, ps), false, true).unwrap();
    }

    /// Waits up to 30 s (a loaded machine) for one message and decodes it.
    fn next_event(u: &Uffd) -> Event {
        let mut buf = [empty_msg(); 1];
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if u.poll(Duration::from_millis(50)).unwrap() && u.read_msgs(&mut buf).unwrap() == 1 {
                return decode(&buf[0]);
            }
        }
        panic!("no uffd message within 30 s");
    }

    /// Real kernel events decode from the union member the kernel fills: the faulting thread's
    /// id, DONTNEED's and munmap's `[start, end)`, mremap's `from`/`to`/`len`.
    #[test]
    fn kernel_events_decode_with_their_fields() {
        use rustix::mm::{self, MapFlags, MremapFlags, ProtFlags};
        let ps = hetmm_core::types::PAGE_SIZE;
        let u = Uffd::open(Features::REQUIRED, Features::OPTIONAL).expect("open uffd");
        assert!(u.features().contains(Features::THREAD_ID | Features::EVENT_REMOVE | Features::EVENT_UNMAP));
        assert!(u.features().contains(Features::EVENT_REMAP));
        // SAFETY: a fresh anonymous mapping that nothing else uses; unmapped below.
        let base = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                8 * ps as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .unwrap() as u64;
        // A destination for mremap, reserved now so MREMAP_FIXED replaces nothing of others'.
        // SAFETY: as above.
        let dst =
            unsafe { mm::mmap_anonymous(std::ptr::null_mut(), ps as usize, ProtFlags::empty(), MapFlags::PRIVATE) }
                .unwrap() as u64;
        // SAFETY: the test's own fresh mapping, which the test serves.
        unsafe { u.register(VaRange::new(base, 4 * ps), RegisterMode::MISSING) }.unwrap();
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                // SAFETY: `base` is mapped and registered; the read blocks until the copy below.
                let v = unsafe { std::ptr::read_volatile((base + 5) as *const u8) };
                (v, rustix::thread::gettid().as_raw_nonzero().get() as u32)
            });
            let ev = next_event(&u);
            u.copy(base, &vec![4u8; ps as usize]).unwrap();
            let (v, tid) = t.join().unwrap();
            assert_eq!(v, 4);
            assert_eq!(ev, Event::Pagefault { addr: base, flags: 0, tid });

            // SAFETY: drops pages of our own test mapping that nothing references.
            let t =
                s.spawn(move || unsafe { mm::madvise((base + ps) as *mut _, ps as usize, mm::Advice::LinuxDontNeed) });
            assert_eq!(next_event(&u), Event::Remove { start: base + ps, end: base + 2 * ps });
            t.join().unwrap().unwrap();

            // SAFETY: moves one page of our own test mapping onto the reserved `dst`.
            let t = s.spawn(move || unsafe {
                mm::mremap_fixed(
                    (base + 2 * ps) as *mut _,
                    ps as usize,
                    ps as usize,
                    MremapFlags::MAYMOVE,
                    dst as *mut _,
                )
                .map(|p| p as u64)
            });
            // mremap also unmaps the source (an UNMAP event after the REMAP) and waits for both.
            let mut evs = vec![next_event(&u)];
            while !t.is_finished() {
                if u.poll(Duration::from_millis(50)).unwrap() {
                    let mut buf = [empty_msg(); 4];
                    let n = u.read_msgs(&mut buf).unwrap();
                    evs.extend(buf[..n].iter().map(decode));
                }
            }
            t.join().unwrap().unwrap();
            eprintln!("mremap events: {evs:x?}");
            assert_eq!(evs[0], Event::Remap { from: base + 2 * ps, to: dst, len: ps });

            // SAFETY: unmaps one page of our own test mapping.
            let t = s.spawn(move || unsafe { mm::munmap((base + 3 * ps) as *mut _, ps as usize) });
            assert_eq!(next_event(&u), Event::Unmap { start: base + 3 * ps, end: base + 4 * ps });
            t.join().unwrap().unwrap();
        });
        drop(u);
        // SAFETY: our own test mappings (parts already gone are skipped by munmap).
        unsafe {
            mm::munmap(base as *mut _, 8 * ps as usize).unwrap();
            mm::munmap(dst as *mut _, ps as usize).unwrap();
        }
    }
}
