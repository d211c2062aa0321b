//! The link between the device and host memory (PCIe or NVLink on a real GPU). A kernel's access
//! to host memory mapped remotely crosses it: besides the access itself (which the simulator does
//! at host-memory speed, as it does local accesses), the bytes occupy the link for
//! `bytes / bandwidth`, and every warp shares the one link. Without this a remote mapping would
//! cost the simulated device nothing, and a policy that never migrates would look best.
//!
//! Migrations are not charged here: the copy engines' copies are real memory copies and cost what
//! they cost on this machine, which is what the link's default bandwidth is set beside (see
//! [`crate::SimConfig::link_gbps`]): a remote byte then costs about what migrating it costs, as on
//! a GPU whose copy engines and remote accesses share one PCIe link.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes a warp accumulates before it reserves link time (and again at the end of each block):
/// one atomic and one wait per 256 KiB, not per load.
pub(crate) const BATCH: u64 = 256 << 10;

/// A wait at least this long sleeps; a shorter one yields in a loop (sleeping overshoots by tens
/// of microseconds on a busy machine).
const SLEEP_FROM: Duration = Duration::from_micros(200);

/// The device's one link to host memory.
#[derive(Debug)]
pub(crate) struct Link {
    /// Bytes per nanosecond (GB/s); `None`: remote accesses cost nothing extra.
    gbps: Option<u32>,
    epoch: Instant,
    /// When the link is next free, in nanoseconds since `epoch`.
    free_at: AtomicU64,
    /// Nanoseconds of link time reserved so far.
    busy: AtomicU64,
}

impl Link {
    pub(crate) fn new(gbps: Option<u32>) -> Self {
        Self {
            gbps: gbps.filter(|g| *g > 0),
            epoch: Instant::now(),
            free_at: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        }
    }

    /// Nanoseconds of link time charged so far.
    pub(crate) fn busy_ns(&self) -> u64 {
        self.busy.load(Ordering::Relaxed)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Reserves the link for `bytes` after every earlier reservation; returns when the transfer
    /// ends (nanoseconds since the epoch), or `None` when nothing is charged.
    fn reserve(&self, bytes: u64) -> Option<u64> {
        let gbps = u64::from(self.gbps?);
        let dur = bytes.div_ceil(gbps);
        if dur == 0 {
            return None;
        }
        self.busy.fetch_add(dur, Ordering::Relaxed);
        let now = self.now_ns();
        let mut cur = self.free_at.load(Ordering::Relaxed);
        loop {
            let end = cur.max(now).saturating_add(dur);
            match self.free_at.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(end),
                Err(x) => cur = x,
            }
        }
    }

    /// Moves `bytes` over the link: returns once the link has carried them after everything
    /// reserved before. Bounded: a reservation ends at most `bytes / gbps` after the earlier
    /// ones, which are bounded the same way.
    pub(crate) fn transfer(&self, bytes: u64) {
        let Some(end) = self.reserve(bytes) else { return };
        loop {
            let now = self.now_ns();
            if now >= end {
                return;
            }
            let left = Duration::from_nanos(end - now);
            if left >= SLEEP_FROM {
                std::thread::sleep(left);
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_link_charges_nothing() {
        // 0 GB/s would never finish: taken as free.
        for l in [Link::new(None), Link::new(Some(0))] {
            let t = Instant::now();
            l.transfer(1 << 30);
            assert!(t.elapsed() < Duration::from_secs(1));
            assert_eq!(l.busy_ns(), 0);
        }
    }

    #[test]
    fn transfers_take_their_time_one_after_another() {
        // 1 GB/s: 2 MB take 2 ms, and two threads' transfers queue on the one link.
        let l = std::sync::Arc::new(Link::new(Some(1)));
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                let l = &l;
                s.spawn(move || l.transfer(2_000_000));
            }
        });
        assert!(t.elapsed() >= Duration::from_millis(4), "{:?}", t.elapsed());
        assert_eq!(l.busy_ns(), 4_000_000);
    }
}
