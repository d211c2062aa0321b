//! Helpers the host crate's test modules share.

use std::io::{Seek, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Held by the tests that fork or run the fork handlers: a fork prepares every tracked address
/// space in the process, so one test's fork changes another's fork counts.
pub(crate) static FORKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This test's turn to fork (see [`FORKS`]).
pub(crate) fn fork_turn() -> std::sync::MutexGuard<'static, ()> {
    FORKS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fresh file, already unlinked, open for reading and writing.
pub(crate) fn tempfile() -> std::fs::File {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "hetmm-host-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    f
}

/// A fresh file holding `data`, positioned at its start (to `read(2)` from: a kernel-mode write
/// into the buffer read into).
pub(crate) fn file_with(data: &[u8]) -> std::fs::File {
    let mut f = tempfile();
    f.write_all(data).unwrap();
    f.rewind().unwrap();
    f
}

/// `len` bytes of fresh private anonymous memory, every byte `fill` (the program's own memory,
/// to register).
pub(crate) fn private_filled(len: usize, fill: u8) -> *mut libc::c_void {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks: it replaces
    // nothing.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    // SAFETY: `p` is the `len`-byte read-write mapping just made (checked not MAP_FAILED).
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), fill, len) };
    p
}

/// Fresh private memory of `len` bytes filled with `fill`, registered with `host`: its address
/// and the CPU side (kept, as the core keeps it; the registration itself is dropped, so faults
/// there are the core's at once).
pub(crate) fn registered_private(
    host: &std::sync::Arc<crate::Host>,
    len: usize,
    fill: u8,
) -> (usize, std::sync::Arc<dyn hetmm_core::cpu::CpuMmu>) {
    let p = private_filled(len, fill) as usize;
    let reg = host.register(p as u64, len as u64).unwrap();
    (p, std::sync::Arc::clone(&reg.cpu))
}
