//! The device's waits: std's futex-based mutex and condition variables rather than
//! `parking_lot`, because device threads sleep in them while the program may fork (see
//! [`crate::fault`]). A poisoned lock is taken anyway: every critical section leaves its state
//! consistent before anything in it can panic.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Locks `m`.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The instant `timeout` from now; a timeout too long to add (`Duration::MAX`, a caller's
/// "forever") gives a deadline about 136 years away instead of a panic (as the CUDA backend's
/// `deadline_after`).
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(1 << 32))
}

/// Sleeps on `cv` at most `timeout` (wake-ups may be spurious).
pub(crate) fn wait_for<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>, timeout: Duration) -> MutexGuard<'a, T> {
    cv.wait_timeout(g, timeout).unwrap_or_else(PoisonError::into_inner).0
}

/// Sleeps on `cv` until `done` holds for the guarded state or `deadline` passes; returns the
/// guard and whether `done` held.
pub(crate) fn wait_until<'a, T>(
    cv: &Condvar,
    mut g: MutexGuard<'a, T>,
    deadline: Instant,
    done: impl Fn(&T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    while !done(&g) {
        let now = Instant::now();
        if now >= deadline {
            return (g, false);
        }
        g = wait_for(cv, g, deadline - now);
    }
    (g, true)
}
