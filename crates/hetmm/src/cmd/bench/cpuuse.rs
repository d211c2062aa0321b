//! Where the CPUs went during a timed section: this process's own CPU time, the rest of the
//! machine's, and the hypervisor's steal. On a 2-CPU virtual machine a repeat sometimes takes
//! twice as long as its neighbours; these say whether something outside the benchmark took the
//! CPUs (others' time or steal grows) or hetmm itself did more work (its own time grows).

use std::time::Duration;

use rustix::time::{clock_gettime, ClockId};

/// Seconds of CPU time over one section.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuUse {
    /// This process, all threads, user and system.
    pub own: f64,
    /// Every other process and the kernel's own work (interrupts) on this machine; the
    /// machine's counters tick in 1/`USER_HZ` s, so this is coarse (10 ms steps).
    pub others: f64,
    /// Time the hypervisor ran something else while this machine's CPUs wanted to run.
    pub steal: f64,
}

/// A reading to subtract from a later one.
#[derive(Clone, Copy, Debug)]
pub struct CpuClock {
    own: Duration,
    /// Busy ticks of all CPUs (`/proc/stat`), if readable.
    busy: Option<u64>,
    steal: Option<u64>,
}

impl CpuClock {
    /// Reads the clocks now.
    pub fn now() -> CpuClock {
        let (busy, steal) = machine_ticks().map_or((None, None), |(b, s)| (Some(b), Some(s)));
        let t = clock_gettime(ClockId::ProcessCPUTime);
        CpuClock { own: Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32), busy, steal }
    }

    /// CPU use from `self` to `later`. Where `/proc/stat` cannot be read, others and steal are 0.
    pub fn until(&self, later: &CpuClock) -> CpuUse {
        let hz = rustix::param::clock_ticks_per_second() as f64;
        let own = later.own.saturating_sub(self.own).as_secs_f64();
        let ticks = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / hz,
            _ => 0.0,
        };
        // The machine's busy time includes ours; the rest is everyone else's.
        let others = (ticks(self.busy, later.busy) - own).max(0.0);
        CpuUse { own, others, steal: ticks(self.steal, later.steal) }
    }
}

/// The machine's busy and steal ticks, summed over CPUs, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    parse_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Parses the first (`cpu `) line of `/proc/stat`: user nice system idle iowait irq softirq
/// steal guest guest_nice. Busy is user + nice + system + irq + softirq (guest time is already
/// in user); idle and iowait are not busy, steal is apart.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    if v.len() < 4 {
        return None;
    }
    Some((at(0) + at(1) + at(2) + at(5) + at(6), at(7)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_busy_and_steal() {
        let stat = "cpu  100 2 30 4000 50 6 7 80 9 0\ncpu0 1 2 3 4 5 6 7 8 9 0\nintr 1\n";
        assert_eq!(parse_stat(stat), Some((100 + 2 + 30 + 6 + 7, 80)));
        // Old kernels stop before steal.
        assert_eq!(parse_stat("cpu  1 2 3 4\n"), Some((6, 0)));
        assert_eq!(parse_stat("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_stat("cpu  1 x 3 4\n"), None);
    }

    #[test]
    fn own_time_counts_work_on_this_thread() {
        let a = CpuClock::now();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let u = a.until(&CpuClock::now());
        // Spinning for 30 ms of wall time is some CPU time however busy the machine is.
        assert!(u.own > 0.0, "{u:?}");
    }
}
