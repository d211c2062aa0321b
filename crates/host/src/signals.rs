//! hetmm's own threads take no asynchronous signals: a program's handler runs on its own
//! threads. A handler that ran on the userfaultfd reader and forked (a fork from a signal
//! handler is supported) waited for hetmm's operations to finish while their revokes waited,
//! in the kernel, for that same thread to read their events: the parent deadlocked. Signals a
//! fault raises synchronously (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP) stay unblocked: a
//! blocked one would kill the process instead of reaching its handler.

use std::mem::MaybeUninit;

/// The signals blocked: every one but those a fault raises synchronously.
fn asynchronous() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initializes the set it is given (always succeeds for a valid pointer);
    // sigdelset then changes initialized memory only.
    unsafe {
        libc::sigfillset(set.as_mut_ptr());
        for s in [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL, libc::SIGTRAP] {
            libc::sigdelset(set.as_mut_ptr(), s);
        }
        set.assume_init()
    }
}

/// Replaces this thread's signal mask: `how` (`SIG_BLOCK` or `SIG_SETMASK`) with `set`; returns
/// the mask before.
fn set_mask(how: libc::c_int, set: &libc::sigset_t) -> libc::sigset_t {
    let mut old = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: both pointers are valid for a sigset_t; pthread_sigmask fails only for a bad `how`
    // (ours are valid), and writes `old` whenever it succeeds.
    let r = unsafe { libc::pthread_sigmask(how, set, old.as_mut_ptr()) };
    assert_eq!(r, 0, "pthread_sigmask({how}) failed: {r}");
    // SAFETY: written by the successful call above.
    unsafe { old.assume_init() }
}

/// Blocks asynchronous signals on the calling thread for good (hetmm's own threads call it
/// first thing).
pub(crate) fn block_here() {
    set_mask(libc::SIG_BLOCK, &asynchronous());
}

/// Runs `f` with asynchronous signals blocked on the calling thread, then restores its mask:
/// threads `f` starts (they inherit the mask) take none, while the caller's thread keeps its own.
/// The mask comes back when `f` unwinds too: a program that catches the panic must not keep
/// its signals blocked for good.
pub fn blocked_while<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(libc::sigset_t);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_mask(libc::SIG_SETMASK, &self.0);
        }
    }
    let _restore = Restore(set_mask(libc::SIG_BLOCK, &asynchronous()));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(sig: libc::c_int) -> bool {
        let mut cur = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: a null `set` only reads the mask into `cur`, valid for a sigset_t.
        assert_eq!(unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), cur.as_mut_ptr()) }, 0);
        // SAFETY: written by the call above; sigismember reads it.
        unsafe { libc::sigismember(cur.as_ptr(), sig) == 1 }
    }

    #[test]
    fn threads_started_inside_take_no_asynchronous_signals_and_the_caller_keeps_its_mask() {
        std::thread::spawn(|| {
            assert!(!blocked(libc::SIGUSR1));
            let inside =
                blocked_while(|| std::thread::spawn(|| (blocked(libc::SIGUSR1), blocked(libc::SIGSEGV))).join());
            assert_eq!(inside.unwrap(), (true, false), "SIGUSR1 blocked, SIGSEGV not");
            assert!(!blocked(libc::SIGUSR1), "the caller's mask is back");
            block_here();
            assert!(blocked(libc::SIGTERM) && !blocked(libc::SIGBUS));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_panic_inside_gives_the_caller_its_mask_back() {
        std::thread::spawn(|| {
            assert!(!blocked(libc::SIGUSR1));
            let r = std::panic::catch_unwind(|| blocked_while(|| panic!("a device's attach panicked")));
            assert!(r.is_err());
            assert!(!blocked(libc::SIGUSR1), "SIGUSR1 stayed blocked after the panic");
        })
        .join()
        .unwrap();
    }
}
