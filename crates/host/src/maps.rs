//! The kernel's list of this process's mappings, `/proc/self/maps`: one reader for every use
//! (what registering finds mapped, where a memfd of hetmm is shown, a fork child's copy), which
//! allocates nothing, so that a fork child can use it between `fork()` and its first `exec`
//! or exit.
//!
//! Where the kernel has it (Linux 6.11 and later), the mappings are asked for one at a time with
//! the `PROCMAP_QUERY` ioctl on the file, from the address wanted on: the text lists every
//! mapping below it first, and the kernel formats it at a few microseconds a line (20-30 ms for
//! a process of 10,000 mappings here), which an unmap or a move of hetmm memory would pay each
//! time. Older kernels answer the ioctl with `ENOTTY`, and the text is read instead.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, Ordering};

use hetmm_core::types::{Prot, VaRange};
use linux_raw_sys::general as sys;
use rustix::io::Errno;
use rustix::ioctl::{self, opcode, Opcode, Updater};

/// `PROCMAP_QUERY`: `_IOWR('f', 17, struct procmap_query)` (`linux/fs.h`; not in
/// linux-raw-sys's ioctl table).
const PROCMAP_QUERY: Opcode = opcode::read_write::<sys::procmap_query>(b'f', 17);
const QUERY_READABLE: u64 = sys::procmap_query_flags::PROCMAP_QUERY_VMA_READABLE as u64;
const QUERY_WRITABLE: u64 = sys::procmap_query_flags::PROCMAP_QUERY_VMA_WRITABLE as u64;
const QUERY_EXECUTABLE: u64 = sys::procmap_query_flags::PROCMAP_QUERY_VMA_EXECUTABLE as u64;
const QUERY_SHARED: u64 = sys::procmap_query_flags::PROCMAP_QUERY_VMA_SHARED as u64;
const QUERY_COVERING_OR_NEXT: u64 = sys::procmap_query_flags::PROCMAP_QUERY_COVERING_OR_NEXT_VMA as u64;
const QUERY_FILE_BACKED: u64 = sys::procmap_query_flags::PROCMAP_QUERY_FILE_BACKED_VMA as u64;

/// Which mappings a walk wants: the kernel skips the others itself when asked by
/// `PROCMAP_QUERY` (the text is filtered as it is read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Which {
    /// Every mapping.
    All,
    /// `MAP_SHARED` mappings of files (a memfd's views among them).
    SharedFiles,
}

impl Which {
    fn query_flags(self) -> u64 {
        match self {
            Which::All => 0,
            Which::SharedFiles => QUERY_SHARED | QUERY_FILE_BACKED,
        }
    }

    fn wants(self, v: &MapsLine) -> bool {
        match self {
            Which::All => true,
            Which::SharedFiles => v.shared && v.file.ino != 0,
        }
    }
}

/// Whether the kernel answers `PROCMAP_QUERY`: not tried yet, yes, no.
static QUERY: AtomicU8 = AtomicU8::new(UNTRIED);
const UNTRIED: u8 = 0;
const QUERIES: u8 = 1;
const TEXT_ONLY: u8 = 2;

/// A file as `/proc/self/maps` names it: device (major, minor) and inode. Both name it: inode
/// numbers are per file system, and a memfd's and a tmpfs file's are often the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct MapsFile {
    pub(crate) dev: (u32, u32),
    /// The inode number (0: anonymous memory).
    pub(crate) ino: u64,
}

impl MapsFile {
    /// The file `fd` is, as `/proc/self/maps` names it.
    pub(crate) fn of(fd: impl std::os::fd::AsFd) -> Result<MapsFile, rustix::io::Errno> {
        let st = rustix::fs::fstat(fd)?;
        Ok(MapsFile { dev: (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev)), ino: st.st_ino })
    }
}

/// One mapping (VMA) of `/proc/self/maps`, whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapsLine {
    /// Its addresses.
    pub(crate) range: VaRange,
    /// Read and write access.
    pub(crate) prot: Prot,
    /// `PROT_EXEC` (which [`Prot`] cannot say).
    pub(crate) exec: bool,
    /// `MAP_SHARED`.
    pub(crate) shared: bool,
    /// The file offset of its first byte.
    pub(crate) off: u64,
    /// The file it shows.
    pub(crate) file: MapsFile,
}

/// Parses `start-end perms offset major:minor inode [path]` (numbers in hex, the inode in
/// decimal). No allocation.
pub(crate) fn parse_line(line: &[u8]) -> Option<MapsLine> {
    let mut fields = line.split(|&c| c == b' ').filter(|f| !f.is_empty());
    let span = fields.next()?;
    let perms = fields.next()?;
    let off = number(fields.next()?, 16)?;
    let dev = fields.next()?;
    let ino = number(fields.next()?, 10)?;
    let dash = span.iter().position(|&c| c == b'-')?;
    let (start, end) = (number(&span[..dash], 16)?, number(&span[dash + 1..], 16)?);
    let colon = dev.iter().position(|&c| c == b':')?;
    let major = u32::try_from(number(&dev[..colon], 16)?).ok()?;
    let minor = u32::try_from(number(&dev[colon + 1..], 16)?).ok()?;
    let mut prot = Prot::empty();
    if perms.first() == Some(&b'r') {
        prot |= Prot::READ;
    }
    if perms.get(1) == Some(&b'w') {
        prot |= Prot::WRITE;
    }
    Some(MapsLine {
        range: VaRange::new(start, end.checked_sub(start)?),
        prot,
        exec: perms.get(2) == Some(&b'x'),
        shared: perms.get(3) == Some(&b's'),
        off,
        file: MapsFile { dev: (major, minor), ino },
    })
}

/// A number in `radix` (no sign, no prefix); `None` if empty, not a number, or too large.
fn number(digits: &[u8], radix: u32) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &c| {
        let d = u64::from(char::from(c).to_digit(radix)?);
        acc.checked_mul(u64::from(radix))?.checked_add(d)
    })
}

/// Calls `each` with every mapping of `/proc/self/maps`, in address order, until it returns
/// false. Only system calls and the stack (a fork child uses it).
pub(crate) fn for_each(which: Which, each: impl FnMut(MapsLine) -> bool) -> Result<(), Errno> {
    for_each_from(0, which, each)
}

/// [`for_each`] from the mapping that contains or follows `from` on: with `PROCMAP_QUERY`, the
/// mappings below are never looked at.
fn for_each_from(from: u64, which: Which, mut each: impl FnMut(MapsLine) -> bool) -> Result<(), Errno> {
    // Opened on every call, never kept: "self" is whoever opens it, and a fork child must read
    // its own mappings, not its parent's.
    let maps = rustix::fs::open(
        c"/proc/self/maps",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    if QUERY.load(Ordering::Relaxed) != TEXT_ONLY {
        match queried(&maps, from, which, &mut each) {
            Err(Errno::NOTTY | Errno::INVAL) if QUERY.load(Ordering::Relaxed) == UNTRIED => {
                QUERY.store(TEXT_ONLY, Ordering::Relaxed);
            }
            r => return r,
        }
    }
    text(&maps, from, &mut |v| !which.wants(&v) || each(v))
}

/// The mappings from `from` on, one `PROCMAP_QUERY` each. `ENOTTY` (or `EINVAL`) before the
/// first answer when the kernel lacks the ioctl.
fn queried(maps: &OwnedFd, from: u64, which: Which, each: &mut impl FnMut(MapsLine) -> bool) -> Result<(), Errno> {
    let mut addr = from;
    loop {
        let Some(vma) = query(maps, addr, which)? else { return Ok(()) };
        QUERY.store(QUERIES, Ordering::Relaxed);
        addr = vma.range.end();
        if !each(vma) || addr == 0 {
            return Ok(());
        }
    }
}

/// The mapping of `which` that contains `addr`, or the first one above it; `None` past the last.
fn query(maps: &OwnedFd, addr: u64, which: Which) -> Result<Option<MapsLine>, Errno> {
    let mut q = sys::procmap_query {
        size: std::mem::size_of::<sys::procmap_query>() as u64,
        query_flags: QUERY_COVERING_OR_NEXT | which.query_flags(),
        query_addr: addr,
        vma_start: 0,
        vma_end: 0,
        vma_flags: 0,
        vma_page_size: 0,
        vma_offset: 0,
        inode: 0,
        dev_major: 0,
        dev_minor: 0,
        // No name and no build id: the kernel writes nothing through the two addresses.
        vma_name_size: 0,
        build_id_size: 0,
        vma_name_addr: 0,
        build_id_addr: 0,
    };
    // SAFETY: PROCMAP_QUERY takes a `procmap_query` of the size given in its first field,
    // borrowed for the call; with both sizes 0 the kernel writes only into the struct.
    match unsafe { ioctl::ioctl(maps, Updater::<PROCMAP_QUERY, _>::new(&mut q)) } {
        Ok(()) => {}
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e),
    }
    let Some(len) = q.vma_end.checked_sub(q.vma_start) else { return Err(Errno::RANGE) };
    let mut prot = Prot::empty();
    if q.vma_flags & QUERY_READABLE != 0 {
        prot |= Prot::READ;
    }
    if q.vma_flags & QUERY_WRITABLE != 0 {
        prot |= Prot::WRITE;
    }
    Ok(Some(MapsLine {
        range: VaRange::new(q.vma_start, len),
        prot,
        exec: q.vma_flags & QUERY_EXECUTABLE != 0,
        shared: q.vma_flags & QUERY_SHARED != 0,
        off: q.vma_offset,
        file: MapsFile { dev: (q.dev_major, q.dev_minor), ino: q.inode },
    }))
}

/// The mappings of the text of `maps` that end above `from`, parsed line by line.
fn text(maps: &OwnedFd, from: u64, each: &mut impl FnMut(MapsLine) -> bool) -> Result<(), Errno> {
    let mut buf = [0u8; 4096];
    // The start of the current line (the fields before the path fit: at most about 100 bytes).
    let mut line = [0u8; 160];
    let mut at = 0;
    loop {
        let got = match rustix::io::read(maps, &mut buf) {
            Ok(0) => return Ok(()),
            Ok(got) => got,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        };
        for &c in &buf[..got] {
            if c != b'\n' {
                if at < line.len() {
                    line[at] = c;
                    at += 1;
                }
                continue;
            }
            let vma = parse_line(&line[..at]);
            at = 0;
            if let Some(vma) = vma.filter(|v| v.range.end() > from) {
                if !each(vma) {
                    return Ok(());
                }
            }
        }
    }
}

/// The mappings that meet `range`, whole, in address order; `None` if the list cannot be read.
pub(crate) fn meeting(range: VaRange) -> Option<Vec<MapsLine>> {
    let mut out = Vec::new();
    for_each_from(range.start, Which::All, |v| {
        if v.range.start >= range.end() {
            return false;
        }
        if v.range.intersect(&range).is_some() {
            out.push(v);
        }
        true
    })
    .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        let l = parse_line(b"7f0a12345000-7f0a12347000 rw-s 00003000 00:01 4242    /memfd:hetmm (deleted)").unwrap();
        assert_eq!(l.range, VaRange::new(0x7f0a_1234_5000, 0x2000));
        assert_eq!((l.prot, l.exec, l.shared, l.off), (Prot::READ | Prot::WRITE, false, true, 0x3000));
        assert_eq!(l.file, MapsFile { dev: (0, 1), ino: 4242 });
        let l = parse_line(b"1000-2000 r-xp 00000000 fd:1a 0").unwrap();
        assert_eq!((l.prot, l.exec, l.shared), (Prot::READ, true, false));
        assert_eq!(l.file.dev, (0xfd, 0x1a));
        assert!(parse_line(b"1000-2000 rw-p").is_none());
        assert!(parse_line(b"2000-1000 rw-p 0 00:00 0").is_none());
        assert!(parse_line(b"1000-2000 rw-p 0 00:00 99999999999999999999999").is_none());
    }

    /// The mappings of `which` inside `range` as the text says, and as `PROCMAP_QUERY` does
    /// (other tests may change mappings outside it meanwhile).
    /// `None` where the kernel lacks the ioctl.
    fn both_ways(range: VaRange, which: Which) -> Option<(Vec<MapsLine>, Vec<MapsLine>)> {
        let open =
            || rustix::fs::open(c"/proc/self/maps", rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
        let mut from_text = Vec::new();
        // Mappings that reach into `range`, cut to it: an inaccessible page at its edge may
        // have merged with a neighbour of the same kind (another test's reservation, a stack's
        // guard), which may change between the two reads.
        text(&open(), range.start, &mut |mut v| {
            if let Some(r) = range.intersect(&v.range).filter(|_| which.wants(&v)) {
                v.range = r;
                from_text.push(v);
            }
            v.range.end() < range.end()
        })
        .unwrap();
        let mut queried_ = Vec::new();
        let r = queried(&open(), range.start, which, &mut |mut v| {
            if let Some(r) = range.intersect(&v.range) {
                v.range = r;
                queried_.push(v);
            }
            v.range.end() < range.end()
        });
        match r {
            Err(Errno::NOTTY) => None,
            r => {
                r.unwrap();
                Some((from_text, queried_))
            }
        }
    }

    /// The two ways of reading agree on every field, over mappings of every kind: a shared
    /// memfd at an offset, private read-write, read-only, executable and inaccessible memory.
    #[test]
    fn queries_and_text_agree() {
        let page = hetmm_core::types::PAGE_SIZE;
        let fd = rustix::fs::memfd_create("maps-agree", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 8 * page).unwrap();
        use rustix::mm::{MapFlags, ProtFlags};
        let rw = ProtFlags::READ | ProtFlags::WRITE;
        // A reservation that the test's mappings replace piece by piece, so that they lie
        // together and no other test's mapping lies between them.
        // SAFETY: a new private mapping where the kernel chooses replaces nothing.
        let base = unsafe {
            rustix::mm::mmap_anonymous(std::ptr::null_mut(), 6 * page as usize, ProtFlags::empty(), MapFlags::PRIVATE)
        }
        .unwrap() as u64;
        let kinds = [
            (rw, MapFlags::SHARED | MapFlags::FIXED, Some(3 * page)),
            (rw, MapFlags::PRIVATE | MapFlags::FIXED, None),
            (ProtFlags::READ, MapFlags::PRIVATE | MapFlags::FIXED, None),
            (ProtFlags::READ | ProtFlags::EXEC, MapFlags::PRIVATE | MapFlags::FIXED, None),
        ];
        for (i, &(prot, flags, off)) in kinds.iter().enumerate() {
            let at = (base + (i as u64 + 1) * page) as *mut std::ffi::c_void;
            // SAFETY: each replaces one page of the test's own reservation.
            let p = unsafe {
                match off {
                    Some(off) => rustix::mm::mmap(at, page as usize, prot, flags, &fd, off),
                    None => rustix::mm::mmap_anonymous(at, page as usize, prot, flags),
                }
            }
            .unwrap();
            assert_eq!(p, at);
        }
        let whole = VaRange::new(base, 6 * page);
        let (all, shared) = (both_ways(whole, Which::All), both_ways(whole, Which::SharedFiles));
        // SAFETY: the test's own mappings; nothing refers to them.
        unsafe { rustix::mm::munmap(base as *mut _, 6 * page as usize) }.unwrap();
        let (Some((from_text, queried_)), Some((shared_text, shared_queried))) = (all, shared) else {
            eprintln!("skipped: this kernel has no PROCMAP_QUERY (Linux 6.11 or later); the text is read instead");
            return;
        };
        assert_eq!(from_text, queried_);
        let ours = queried_;
        assert_eq!(ours.len(), 6, "{ours:x?}");
        assert!(ours[1].shared && ours[1].off == 3 * page && ours[1].file == MapsFile::of(&fd).unwrap());
        assert_eq!((ours[2].prot, ours[2].shared, ours[2].file.ino), (Prot::READ | Prot::WRITE, false, 0));
        assert_eq!((ours[3].prot, ours[3].exec), (Prot::READ, false));
        assert_eq!((ours[4].prot, ours[4].exec), (Prot::READ, true));
        assert_eq!(ours[5].prot, Prot::empty());
        // Asked for shared files only, the kernel skips the rest itself.
        assert_eq!(shared_text, shared_queried);
        assert_eq!(shared_queried, [ours[1]]);
    }

    /// A fresh shared memfd mapping is found whole, as that file, at its offset.
    #[test]
    fn finds_a_shared_memfd_mapping() {
        let page = hetmm_core::types::PAGE_SIZE;
        let fd = rustix::fs::memfd_create("maps-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 4 * page).unwrap();
        let rw = rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE;
        // SAFETY: a new shared mapping where the kernel chooses replaces nothing.
        let p = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), 2 * page as usize, rw, rustix::mm::MapFlags::SHARED, &fd, page)
        }
        .unwrap();
        let at = VaRange::new(p as u64, 2 * page);
        let found = meeting(VaRange::new(at.start + page, page)).unwrap();
        // SAFETY: the test's own mapping, nothing refers to it.
        unsafe { rustix::mm::munmap(p, 2 * page as usize) }.unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        let v = found[0];
        assert!(v.range.contains_range(&at) && v.shared && v.prot == Prot::READ | Prot::WRITE);
        assert_eq!(v.file, MapsFile::of(&fd).unwrap());
        assert_eq!(v.off + (at.start - v.range.start), page);
    }
}
