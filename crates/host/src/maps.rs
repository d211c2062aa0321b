//! The kernel's list of this process's mappings, `/proc/self/maps`: one parser for every use
//! (what registering finds mapped, where a memfd of hetmm is shown, a fork child's copy), which
//! allocates nothing, so that a fork child can use it between `fork()` and its first `exec`
//! or exit.

use hetmm_core::types::{Prot, VaRange};

/// A file as `/proc/self/maps` names it: device (major, minor) and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
pub(crate) fn for_each(mut each: impl FnMut(MapsLine) -> bool) -> Result<(), rustix::io::Errno> {
    use rustix::io::Errno;
    let maps = rustix::fs::open(
        c"/proc/self/maps",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let mut buf = [0u8; 4096];
    // The start of the current line (the fields before the path fit: at most about 100 bytes).
    let mut line = [0u8; 160];
    let mut at = 0;
    loop {
        let got = match rustix::io::read(&maps, &mut buf) {
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
            if let Some(vma) = vma {
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
    for_each(|v| {
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
