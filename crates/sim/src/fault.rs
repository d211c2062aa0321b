//! The replayable fault buffer.
//!
//! A warp whose translation fails writes a [`DeviceFault`] into the bounded buffer (waiting,
//! bounded, while it is full) and stalls until the next replay. A replay bumps a sequence
//! number and wakes the stalled warps; each retries its access unless its faulting page is in
//! that replay's cancel list and the core had fetched its fault by then, in which case the
//! access fails with [`DeviceError::FaultCancelled`] (a replay's cancels answer the faults the
//! core fetched: a warp whose fault came in later, on the same page, retries). After [`FaultBuffer::shutdown`] every present and future
//! fault fails with [`FaultCancel::Detached`].
//!
//! Waiting uses std's futex-based mutex and condition variables, not `parking_lot`: the device's
//! fault-service thread and stalled warps sleep here, also while the program forks, and a thread
//! parked in `parking_lot`'s process-wide table at a fork leaves the child a corrupt table
//! (parking_lot issue #515; see `hetmm_core::fork`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hetmm_core::device::{DeviceError, DeviceFault, FaultCancel};
use hetmm_core::types::{Access, Prot};

use crate::sync::{lock, wait_for};
use std::sync::{Condvar, Mutex};

/// How often a stalled warp re-checks for replay, shutdown or device teardown.
const POLL: Duration = Duration::from_millis(5);
/// Cancel lists remembered for warps that slept through several replays.
const CANCEL_HISTORY: usize = 64;

/// A replay's cancels by page: what an access must need to be answered, and why.
type PageCancels = HashMap<u64, (Prot, FaultCancel)>;

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<DeviceFault>,
    replay_seq: u64,
    /// Entries ever queued: the last one's ticket.
    queued: u64,
    /// Entries ever taken out (fetched, or dropped at a shutdown): the tickets up to this one.
    taken: u64,
    /// `(sequence number of the replay, pages it cancelled, tickets fetched by then)`, most
    /// recent last.
    /// Each page's cancel holds what an access must need to be answered by it (the weakest of
    /// the page's cancels: see [`FaultBuffer::replay`]).
    cancels: VecDeque<(u64, PageCancels, u64)>,
    /// Access-counter notices not yet taken: starts of 2 MiB regions, each once.
    notices: Vec<u64>,
    shutdown: bool,
    /// Shutdowns so far: a fault raised before one fails with `Detached` even if the buffer is
    /// re-armed ([`FaultBuffer::reset`]) before its warp wakes.
    epoch: u64,
}

/// Fault counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultCounters {
    /// Entries written to the buffer.
    pub raised: u64,
    /// Replays.
    pub replays: u64,
    /// Faulting accesses that got a cancellation.
    pub cancelled: u64,
    /// Times a warp found the buffer full and waited.
    pub buffer_full_waits: u64,
    /// Entries handed out by fetch.
    pub fetched: u64,
}

/// The fault buffer.
#[derive(Debug)]
pub struct FaultBuffer {
    capacity: usize,
    state: Mutex<State>,
    counters: Mutex<FaultCounters>,
    /// Signalled when an entry is written (for `wait_for_faults`).
    pending: Condvar,
    /// Signalled when entries are fetched (space) or a replay or shutdown happens.
    wake: Condvar,
}

impl FaultBuffer {
    /// A buffer of `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
            counters: Mutex::new(FaultCounters::default()),
            pending: Condvar::new(),
            wake: Condvar::new(),
        }
    }

    /// Counters so far.
    pub fn counters(&self) -> FaultCounters {
        *lock(&self.counters)
    }

    /// Records a fault by `client` at `va` and waits for the replay that resolves it.
    /// `Ok(())` means: retry the access. `stopping` is the device's teardown flag; `limit`
    /// bounds the whole wait.
    pub fn raise_and_wait(
        &self,
        va: u64,
        access: Access,
        client: u32,
        stopping: &AtomicBool,
        limit: Duration,
    ) -> Result<(), DeviceError> {
        let deadline = crate::sync::deadline_after(limit);
        let detached = DeviceError::FaultCancelled { va, access, reason: FaultCancel::Detached };
        let mut st = lock(&self.state);
        let mut waited_for_space = false;
        loop {
            if st.shutdown {
                lock(&self.counters).cancelled += 1;
                return Err(detached);
            }
            if stopping.load(Ordering::Relaxed) {
                return Err(DeviceError::Shutdown);
            }
            if st.queue.len() < self.capacity {
                break;
            }
            if !waited_for_space {
                waited_for_space = true;
                lock(&self.counters).buffer_full_waits += 1;
            }
            if Instant::now() >= deadline {
                return Err(DeviceError::Timeout(limit));
            }
            st = wait_for(&self.wake, st, POLL);
        }
        st.queue.push_back(DeviceFault { va, access, client });
        st.queued += 1;
        let (my_seq, my_epoch, my_ticket) = (st.replay_seq, st.epoch, st.queued);
        lock(&self.counters).raised += 1;
        self.pending.notify_all();
        let page = va & !0xfff;
        loop {
            if st.shutdown || st.epoch != my_epoch {
                lock(&self.counters).cancelled += 1;
                return Err(detached);
            }
            if stopping.load(Ordering::Relaxed) {
                return Err(DeviceError::Shutdown);
            }
            if st.replay_seq > my_seq {
                // The first replay after the fault decides: every stalled warp retries then unless
                // it cancels the page and answers this fault (the core had fetched it). A later
                // replay's cancels are for faults raised since; one for a fault the core had not
                // fetched (another access to the page, a write to a read-only page, say) is not
                // this one's: it retries (its entry is still queued, to be served).
                let first = my_seq + 1;
                let reason = st
                    .cancels
                    .iter()
                    .find(|(seq, _, _)| *seq == first)
                    .filter(|(_, _, fetched)| my_ticket <= *fetched)
                    .and_then(|(_, m, _)| m.get(&page).copied())
                    .filter(|(needs, _)| access.needs().contains(*needs))
                    .map(|(_, why)| why);
                return match reason {
                    Some(reason) => {
                        lock(&self.counters).cancelled += 1;
                        Err(DeviceError::FaultCancelled { va, access, reason })
                    }
                    None => Ok(()),
                };
            }
            if Instant::now() >= deadline {
                return Err(DeviceError::Timeout(limit));
            }
            st = wait_for(&self.wake, st, POLL);
        }
    }

    /// Moves up to `max` entries into `out` without blocking.
    pub fn fetch(&self, max: usize, out: &mut Vec<DeviceFault>) -> usize {
        let mut st = lock(&self.state);
        let n = max.min(st.queue.len());
        out.extend(st.queue.drain(..n));
        st.taken += n as u64;
        drop(st);
        if n > 0 {
            lock(&self.counters).fetched += n as u64;
            self.wake.notify_all();
        }
        n
    }

    /// Reports an access-counter notice for the 2 MiB region at `region` (once until taken),
    /// waking the core's wait.
    pub fn notify_access(&self, region: u64) {
        let mut st = lock(&self.state);
        if st.shutdown || st.notices.contains(&region) {
            return;
        }
        st.notices.push(region);
        drop(st);
        self.pending.notify_all();
    }

    /// Moves the pending access-counter notices into `out`.
    pub fn take_notices(&self, out: &mut Vec<u64>) {
        out.append(&mut lock(&self.state).notices);
    }

    /// Waits until an entry or an access-counter notice is pending, the buffer is shut down,
    /// `stopping` is set, or `timeout` passes; returns whether either is pending.
    pub fn wait(&self, timeout: Duration, stopping: &AtomicBool) -> bool {
        let deadline = crate::sync::deadline_after(timeout);
        let mut st = lock(&self.state);
        loop {
            if !st.queue.is_empty() || !st.notices.is_empty() {
                return true;
            }
            if st.shutdown || stopping.load(Ordering::Relaxed) {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Bounded slices so that a device teardown (which cannot take this lock from every
            // path) is noticed promptly.
            st = wait_for(&self.pending, st, (deadline - now).min(POLL * 10));
        }
    }

    /// Replays: stalled warps retry, except those a cancel answers: on its page, fetched before
    /// this call, and needing at least what its access needs (see `DeviceMmu::replay`).
    pub fn replay(&self, cancel: &[(u64, Access, FaultCancel)]) {
        let mut st = lock(&self.state);
        st.replay_seq += 1;
        if !cancel.is_empty() {
            let (seq, fetched) = (st.replay_seq, st.taken);
            // Of two cancels of one page, the one answering more accesses (needing less) holds.
            let mut map = PageCancels::new();
            for &(va, access, why) in cancel {
                let needs = access.needs();
                map.entry(va & !0xfff)
                    .and_modify(|e| {
                        if e.0.contains(needs) {
                            *e = (needs, why);
                        }
                    })
                    .or_insert((needs, why));
            }
            st.cancels.push_back((seq, map, fetched));
            while st.cancels.len() > CANCEL_HISTORY {
                st.cancels.pop_front();
            }
        }
        drop(st);
        lock(&self.counters).replays += 1;
        self.wake.notify_all();
    }

    /// Fails every present and future fault with `Detached`; drops pending entries.
    pub fn shutdown(&self) {
        let mut st = lock(&self.state);
        st.shutdown = true;
        st.epoch += 1;
        st.taken = st.queued;
        st.queue.clear();
        st.notices.clear();
        drop(st);
        self.wake.notify_all();
        self.pending.notify_all();
    }

    /// Re-arms the buffer after a shutdown (a new page table, a new address space). A warp still
    /// stalled on a fault of the old page table fails (`Detached`) rather than sleep out its
    /// wait, its entry dropped, or retry against the new table (found by an audit: a page table
    /// destroyed without `shutdown` first, as an attach that fails half-way does).
    pub fn reset(&self) {
        let mut st = lock(&self.state);
        st.shutdown = false;
        st.epoch += 1;
        st.taken = st.queued;
        st.queue.clear();
        st.cancels.clear();
        drop(st);
        self.wake.notify_all();
    }

    /// Wakes every waiter (device teardown).
    pub fn wake_all(&self) {
        let _st = lock(&self.state);
        self.wake.notify_all();
        self.pending.notify_all();
    }

    /// Whether [`FaultBuffer::shutdown`] was called (and not undone by a reset).
    pub fn is_shutdown(&self) -> bool {
        lock(&self.state).shutdown
    }

    /// Entries pending.
    pub fn pending_len(&self) -> usize {
        lock(&self.state).queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn raise_fetch_replay_cancel() {
        let fb = Arc::new(FaultBuffer::new(2));
        let stop = Arc::new(AtomicBool::new(false));
        let mut hs = Vec::new();
        for i in 0..3u32 {
            let (fb, stop) = (fb.clone(), stop.clone());
            hs.push(std::thread::spawn(move || {
                fb.raise_and_wait(0x1000 * u64::from(i + 1) + 8, Access::Read, i, &stop, Duration::from_secs(30))
            }));
        }
        // Capacity 2: the third waits for space until we fetch.
        let deadline = Instant::now() + Duration::from_secs(30);
        while fb.counters().buffer_full_waits == 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(fb.pending_len(), 2);
        let mut out = Vec::new();
        while out.len() < 3 {
            assert!(fb.wait(Duration::from_secs(10), &stop));
            fb.fetch(10, &mut out);
        }
        fb.replay(&[(0x2000, Access::Read, FaultCancel::Protection)]);
        let res: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(res.iter().filter(|r| r.is_ok()).count(), 2);
        assert!(res.contains(&Err(DeviceError::FaultCancelled {
            va: 0x2008,
            access: Access::Read,
            reason: FaultCancel::Protection
        })));
        assert!(!fb.wait(Duration::from_millis(10), &stop));
        fb.shutdown();
        assert!(matches!(
            fb.raise_and_wait(0, Access::Write, 0, &stop, Duration::from_secs(1)),
            Err(DeviceError::FaultCancelled { reason: FaultCancel::Detached, .. })
        ));
        fb.reset();
        stop.store(true, Ordering::Relaxed);
        assert_eq!(fb.raise_and_wait(0, Access::Write, 0, &stop, Duration::from_secs(1)), Err(DeviceError::Shutdown));
    }
}
