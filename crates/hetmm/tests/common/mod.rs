//! Helpers shared by the integration tests (each test file that needs them says `mod common;`).
// Each test file is its own crate and uses only some of these.
#![allow(dead_code)]

/// Waits for the child `pid` (retrying on EINTR) and returns its wait status.
pub fn wait_status(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only the status through the pointer, which is a live local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return status;
        }
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EINTR), "waitpid");
    }
}

/// Waits at most `limit` for the child `pid` and returns its wait status; `None` if it had not
/// ended by then (it is killed and reaped).
pub fn wait_status_within(pid: libc::pid_t, limit: std::time::Duration) -> Option<i32> {
    let t = std::time::Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only the status through the pointer, which is a live local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(status);
        }
        assert!(r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR), "waitpid");
        if t.elapsed() > limit {
            // SAFETY: `pid` is our child, not yet reaped (so not reused); then reaped here.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// One line of `/proc/self/maps`.
pub struct MapsLine {
    pub start: u64,
    pub end: u64,
    /// The permissions column (`rw-s`, say).
    pub perms: String,
    /// The inode of the file mapped (0 for anonymous memory).
    pub ino: u64,
    /// The whole line.
    pub line: String,
}

/// Every line of `/proc/self/maps` (allocates: not for fork children of threaded parents).
pub fn maps() -> Vec<MapsLine> {
    let text = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    text.lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (s, e) = f[0].split_once('-').expect("a range");
            MapsLine {
                start: u64::from_str_radix(s, 16).expect("a hex start"),
                end: u64::from_str_radix(e, 16).expect("a hex end"),
                perms: f[1].to_string(),
                ino: f[4].parse().expect("an inode"),
                line: line.to_string(),
            }
        })
        .collect()
}

/// The lines of `/proc/self/maps` that meet `start..end`.
pub fn maps_meeting(start: u64, end: u64) -> Vec<MapsLine> {
    maps().into_iter().filter(|m| m.start < end && m.end > start).collect()
}

/// A fresh private anonymous read-write mapping of `len` bytes at an address the kernel picks
/// (the caller unmaps it).
pub fn private_anon(len: usize) -> usize {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a new mapping where the kernel chooses: it replaces nothing.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    p as usize
}

/// Launches `kernel` on the simulated device directly, bounded by nothing (a kernel chasing
/// addresses it was given, into memory the program registered). The tests that call it keep
/// `SimDevice::launch`'s contract: their kernels touch memory they mapped with `mmap`, which
/// no Rust reference points into while the kernel runs.
pub fn launch_raw<F>(
    dev: &hetmm::sim::SimDevice,
    grid: hetmm::sim::Grid,
    kernel: F,
) -> Result<hetmm::sim::Launch, hetmm::core::device::DeviceError>
where
    F: Fn(&hetmm::sim::BlockCtx<'_>) -> Result<(), hetmm::core::device::DeviceError> + Send + Sync + 'static,
{
    // SAFETY: the callers' kernels touch only memory no Rust reference points into (above).
    unsafe { dev.launch(grid, kernel) }
}
