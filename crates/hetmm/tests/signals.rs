//! hetmm's own threads take no asynchronous signals, so a program's handler always runs on one of
//! the program's threads. (Its own test binary: no other test's threads are in the process.)

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use hetmm::sim::{SimConfig, SimDevice};
use hetmm::Hetmm;

static HITS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr2(_: libc::c_int) {
    HITS.fetch_add(1, SeqCst);
}

/// The ids of this process's threads whose name starts with `prefix`.
fn threads_named(prefix: &str) -> Vec<libc::pid_t> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.starts_with(prefix).then(|| e.file_name().to_str()?.parse().ok()).flatten()
        })
        .collect()
}

/// A signal sent to each of hetmm's threads (the userfaultfd reader, the CPU-fault servicer, the
/// reaper, a device's fault service) stays pending there: the handler never runs on them. One
/// that forked on the reader deadlocked the parent (the fork waited for an operation whose
/// revoke waited for the reader).
#[test]
fn a_signal_sent_to_hetmms_threads_never_runs_its_handler_there() {
    // SAFETY: installs a handler that only adds to an atomic (async-signal-safe) for SIGUSR2,
    // which nothing else in this test binary uses.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr2 as *const () as usize;
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    let hm = Hetmm::new().expect("userfaultfd and memfd available");
    let _dev = hm.attach_sim(SimDevice::new(SimConfig::default()).unwrap()).unwrap();
    let mut buf = hm.alloc::<u8>(1 << 20).unwrap();
    buf.as_mut_slice().fill(1);
    let ours = threads_named("hetmm-");
    assert!(ours.len() >= 4, "reader, servicer, reaper and the device's threads: {ours:?}");
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    for &tid in &ours {
        // SAFETY: tgkill only sends SIGUSR2 (handled above) to a thread of this process.
        let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR2) };
        assert!(r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH), "tgkill {tid}");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(HITS.load(SeqCst), 0, "the handler ran on one of hetmm's threads");
    // The same signal sent to this thread runs the handler: the check can fail.
    // SAFETY: as above, to this test's own thread.
    let me = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::syscall(libc::SYS_tgkill, pid, me, libc::SIGUSR2) }, 0);
    let t = std::time::Instant::now();
    while HITS.load(SeqCst) == 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::yield_now();
    }
    assert_eq!(HITS.load(SeqCst), 1, "the handler runs on the program's thread");
    assert!(buf.as_slice().iter().all(|&b| b == 1));
}
