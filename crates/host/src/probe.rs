//! In-process measurements of the platform's limits, reported by the CLI: the cost of one
//! userfaultfd round trip, memcpy bandwidth, and whether kernel-mode faults are trapped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmm_core::types::{VaRange, PAGE_SIZE};

use crate::host::Worker;
use crate::mapping::{CopyFn, MappingError, SharedMapping};
use crate::uffd::{self, Event, Features, OpenError, RegisterMode, Uffd, UffdError};

/// Pages of the probe region; it is punched and reused when the iterations outnumber them.
const PROBE_PAGES: u64 = 4096;

/// Why a probe could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No usable userfaultfd.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The probe region could not be made or reset.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// A uffd ioctl failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The handler thread could not be spawned.
    #[error("cannot spawn the probe's handler thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Times `iters` userfaultfd round trips: each touches a fresh page of a memfd region registered
/// MISSING, and a separate handler thread answers with `UFFDIO_COPY` of one 4 KiB page. Each
/// sample is the whole stall the touching thread sees (fault, wake-up of the handler, poll,
/// read, copy, wake-up of the toucher).
pub fn raw_uffd_round_trip(iters: usize) -> Result<Vec<Duration>, ProbeError> {
    let uffd = Arc::new(Uffd::open(Features::MISSING_SHMEM, Features::POISON)?);
    let pages = (iters as u64).clamp(1, PROBE_PAGES);
    let mapping = SharedMapping::new(pages * PAGE_SIZE)?;
    let region = mapping.app_range();
    // SAFETY: the view of the probe's own fresh mapping, served by the probe's handler thread.
    unsafe { uffd.register(region, RegisterMode::MISSING) }?;
    let stop = Arc::new(AtomicBool::new(false));
    let (u, s) = (uffd.clone(), stop.clone());
    let worker = Worker::spawn("hetmm-probe-uffd", move || copy_server(&u, &s)).map_err(ProbeError::Spawn)?;

    let mut samples = Vec::with_capacity(iters);
    let mut result = Ok(());
    for i in 0..iters as u64 {
        let idx = i % pages;
        if idx == 0 && i > 0 {
            // Drop the pages so the next touches fault again (this thread zaps, never the
            // reader).
            if let Err(e) = mapping.punch(region) {
                result = Err(e.into());
                break;
            }
        }
        let t = Instant::now();
        if let Err(e) = mapping.touch_app(region.start + idx * PAGE_SIZE) {
            result = Err(e.into());
            break;
        }
        samples.push(t.elapsed());
    }
    stop.store(true, Ordering::Release);
    worker.join(Duration::from_secs(5));
    let _ = uffd.unregister(region);
    result.map(|()| samples)
}

/// The probe's handler: answer every missing fault with a copy of a staging page.
fn copy_server(uffd: &Uffd, stop: &AtomicBool) {
    let staging = vec![0xA5u8; PAGE_SIZE as usize];
    let mut msgs = [uffd::empty_msg(); 64];
    while !stop.load(Ordering::Acquire) {
        match uffd.poll(Duration::from_millis(100)) {
            Ok(true) => {}
            Ok(false) => continue,
            // Not a busy loop on a persistent error: the stop flag is checked each millisecond.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        let n = uffd.read_msgs(&mut msgs).unwrap_or(0);
        for m in &msgs[..n] {
            let Event::Pagefault { addr, .. } = uffd::decode(m) else { continue };
            let page = addr & !(PAGE_SIZE - 1);
            match uffd.copy(page, &staging) {
                Ok(()) => {}
                // Duplicate message for a page already filled: make sure its waiter runs.
                Err(UffdError::Exists { .. }) => {
                    let _ = uffd.wake(VaRange::new(page, PAGE_SIZE));
                }
                Err(e) => {
                    log::error!("probe copy failed: {e}");
                    // Release the toucher rather than hang it (SIGBUS if poison works).
                    let r = VaRange::new(page, PAGE_SIZE);
                    if uffd.poison(r).is_err() {
                        let _ = uffd.wake(r);
                    }
                }
            }
        }
    }
}

/// Median single-thread memcpy bandwidth in bytes per second over `repeats` copies of `bytes`
/// (0.0 if either is 0). Both buffers are written first so page faults are not timed.
pub fn memcpy_bandwidth(bytes: usize, repeats: usize) -> f64 {
    if bytes == 0 || repeats == 0 {
        return 0.0;
    }
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.fill(2);
    let mut rates: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            bytes as f64 / t.elapsed().as_secs_f64().max(1e-9)
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Median bandwidth in bytes per second of reading host backing the way the simulated device's
/// copy engine does: from the manager's alias of a memfd (4 KiB pages) whose data was just
/// written, so the alias takes its page faults, into a written private buffer, 2 MiB at a time,
/// each piece copied by `copy` (pass the device's own DMA routine).
/// This, not memcpy between private buffers, bounds every host-to-device migration. 0.0 if
/// `bytes` or `repeats` is 0.
pub fn backing_copy_bandwidth(bytes: usize, repeats: usize, copy: CopyFn) -> Result<f64, MappingError> {
    if bytes == 0 || repeats == 0 {
        return Ok(0.0);
    }
    let len = bytes.div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize;
    let chunk = 2 << 20;
    let src = vec![1u8; chunk.min(len)];
    // Page aligned, as device memory is: a destination a few bytes past a page boundary from
    // its source makes every load wait on the store just before it (4 KiB aliasing), which
    // measured 3x slower here (copies 16 bytes off ran at 4.6 GB/s against 15).
    let mut buf = vec![0u8; len + PAGE_SIZE as usize];
    buf.fill(2);
    let skip = buf.as_ptr().align_offset(PAGE_SIZE as usize).min(PAGE_SIZE as usize);
    let dst = &mut buf[skip..skip + len];
    let mut rates = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let m = SharedMapping::new(len as u64)?;
        for off in (0..len).step_by(chunk) {
            m.write_backing(off as u64, &src[..chunk.min(len - off)])?;
        }
        let t = Instant::now();
        for (i, part) in dst.chunks_mut(chunk).enumerate() {
            m.read_alias_with((i * chunk) as u64, part, copy)?;
        }
        std::hint::black_box(&mut *dst);
        rates.push(len as f64 / t.elapsed().as_secs_f64().max(1e-9));
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

/// Whether this process can get a userfaultfd that traps kernel-mode faults (`read(2)` into a
/// device-resident page). False means only `UFFD_USER_MODE_ONLY` is permitted.
pub fn kernel_faults_supported() -> Result<bool, OpenError> {
    Ok(Uffd::open(Features::empty(), Features::empty())?.kernel_faults_supported())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_copy_reads_what_was_written() {
        let m = SharedMapping::new(3 * PAGE_SIZE).unwrap();
        m.write_backing(PAGE_SIZE - 2, &[7, 8, 9, 10]).unwrap();
        let mut b = [0u8; 6];
        m.read_alias(PAGE_SIZE - 3, &mut b).unwrap();
        assert_eq!(b, [0, 7, 8, 9, 10, 0]);
        assert!(m.read_alias(3 * PAGE_SIZE - 2, &mut b).is_err(), "past the end");
        assert!(m.write_backing(u64::MAX - 1, &[1, 2]).is_err(), "overflow");
        assert!(backing_copy_bandwidth(1 << 20, 2, std::ptr::copy_nonoverlapping::<u8>).unwrap() > 0.0);
    }

    #[test]
    fn round_trip_measures_every_touch() {
        // More iterations than probe pages would take long; 300 covers the handler path.
        let s = raw_uffd_round_trip(300).unwrap();
        assert_eq!(s.len(), 300);
        assert!(s.iter().all(|d| *d < Duration::from_secs(1)));
    }

    #[test]
    fn round_trip_reuses_the_region() {
        let n = PROBE_PAGES as usize + 10;
        assert_eq!(raw_uffd_round_trip(n).unwrap().len(), n);
    }

    #[test]
    fn memcpy_and_kernel_faults() {
        assert!(memcpy_bandwidth(1 << 20, 5) > 1e8);
        assert_eq!(memcpy_bandwidth(0, 5), 0.0);
        assert!(kernel_faults_supported().unwrap());
    }
}
