//! Helpers shared by the integration tests (each test file that needs them says `mod common;`).

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
