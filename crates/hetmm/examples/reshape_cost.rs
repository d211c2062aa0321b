//! What a change to a small part of device-resident memory costs: the program registers a
//! buffer, a simulated device takes all of it (again before each change), and then the program
//! - `protect`s one 4 KiB page read-only,
//! - `munmap`s another 4 KiB page,
//! - `mremap`s the buffer's last 2 MiB to a new address.
//!
//! Each change is timed from the call until hetmm has applied it (`settle`), with the bytes it
//! copied home and the blocks it left on the device. memcpy of the whole buffer is measured in
//! the same run for scale. Every byte is checked at the end, at its new address where it moved.
//!
//! `cargo run --release --example reshape_cost -- [SIZE] [REPEAT]` (default 256M 5).

use std::time::Instant;

use hetmm::core::types::Prot;
use hetmm::sim::{SimConfig, SimDevice};
use hetmm::Hetmm;

const PAGE: usize = 4096;
const BLOCK: usize = 2 << 20;

/// One change's cost: seconds, bytes copied home, blocks kept on the device.
#[derive(Clone, Copy, Default)]
struct Cost {
    seconds: f64,
    bytes_home: u64,
    kept: u64,
}

/// The byte at offset `i` of the buffer.
fn pattern(i: usize) -> u8 {
    (i / PAGE) as u8 ^ (i % 251) as u8
}

/// Runs `f`, waits until hetmm has applied what it did, and returns its cost.
fn timed(hm: &Hetmm, f: impl FnOnce()) -> Result<Cost, hetmm::Error> {
    let before = hm.stats();
    let t = Instant::now();
    f();
    hm.space().settle()?;
    let seconds = t.elapsed().as_secs_f64();
    let d = hm.stats().since(&before);
    Ok(Cost { seconds, bytes_home: d.bytes_to_host, kept: d.reshape_blocks_kept })
}

/// Migrates `ranges` (start, length) to `to`, region by region (a change splits its region).
fn to_device(hm: &Hetmm, to: hetmm::Proc, ranges: &[(u64, u64)]) -> Result<(), hetmm::Error> {
    for &(start, len) in ranges {
        for part in hm.space().span_parts(start, len)? {
            hm.migrate(part.start, part.len, to)?;
        }
    }
    Ok(())
}

/// One run in a fresh address space: the costs of the protect, the munmap and the mremap.
fn run(size: usize) -> Result<[Cost; 3], hetmm::Error> {
    let hm = Hetmm::new()?;
    let dev = hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 2 * size as u64, ..SimConfig::default() })?)?;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // The buffer, 2 MiB aligned, and a reserved hole for the mremap to land in.
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), size + 2 * BLOCK, rw, anon, -1, 0) };
    assert_ne!(raw, libc::MAP_FAILED, "mmap of {size} bytes");
    let p = (raw as usize).next_multiple_of(BLOCK) as *mut u8;
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let hole = unsafe { libc::mmap(std::ptr::null_mut(), BLOCK, libc::PROT_NONE, anon, -1, 0) };
    assert_ne!(hole, libc::MAP_FAILED, "mmap of the hole");
    // SAFETY: `p..p + size` lies inside the mapping made above, which nothing else uses.
    let buf = unsafe { std::slice::from_raw_parts_mut(p, size) };
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(i);
    }
    hm.register(p, size)?;
    hm.migrate(p as u64, size as u64, dev.proc())?;
    let protected = size / 2 + 5 * PAGE;
    let unmapped = size / 4 + 9 * PAGE;
    let moved = size - BLOCK;
    let protect = timed(&hm, || hm.protect(p as u64 + protected as u64, PAGE as u64, Prot::READ).expect("protect"))?;
    // Each change finds the whole buffer on the device.
    to_device(&hm, dev.proc(), &[(p as u64, size as u64)])?;
    let munmap = timed(&hm, || {
        // SAFETY: one page of the buffer, which this function owns; it is not touched again.
        assert_eq!(unsafe { libc::munmap(p.add(unmapped).cast(), PAGE) }, 0);
    })?;
    let after = (unmapped + PAGE) as u64;
    to_device(&hm, dev.proc(), &[(p as u64, unmapped as u64), (p as u64 + after, size as u64 - after)])?;
    let mremap = timed(&hm, || {
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        // SAFETY: the buffer's last 2 MiB move onto the reserved hole, which nothing else uses.
        let q = unsafe { libc::mremap(p.add(moved).cast(), BLOCK, BLOCK, flags, hole) };
        assert_eq!(q, hole, "mremap");
    })?;
    for (i, b) in buf[..moved].iter().enumerate() {
        if !(unmapped..unmapped + PAGE).contains(&i) {
            assert_eq!(*b, pattern(i), "byte {i}");
        }
    }
    // SAFETY: the moved 2 MiB now live at `hole`.
    let tail = unsafe { std::slice::from_raw_parts(hole as *const u8, BLOCK) };
    for (i, b) in tail.iter().enumerate() {
        assert_eq!(*b, pattern(moved + i), "moved byte {i}");
    }
    hm.unregister(p, unmapped)?;
    hm.unregister(p.wrapping_add(unmapped + PAGE), moved - unmapped - PAGE)?;
    hm.unregister(hole as *const u8, BLOCK)?;
    // SAFETY: every part was unregistered; the mappings are this function's own.
    unsafe {
        libc::munmap(raw, size + 2 * BLOCK);
        libc::munmap(hole, BLOCK);
    }
    Ok([protect, munmap, mremap])
}

fn main() -> Result<(), hetmm::Error> {
    let mut args = std::env::args().skip(1);
    let size = args.next().and_then(|s| hetmm::parse_size(&s)).unwrap_or(256 << 20) as usize;
    let size = size.next_multiple_of(BLOCK).max(4 * BLOCK);
    let repeat: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5).max(1);
    let runs = (0..repeat).map(|_| run(size)).collect::<Result<Vec<_>, _>>()?;
    let memcpy = size as f64 / hetmm::host::probe::memcpy_bandwidth(size, 5);
    println!("buffer {} MiB on the sim device; memcpy of it {:.2} ms (same run)", size >> 20, memcpy * 1e3);
    for (k, what) in ["protect 4 KiB", "munmap 4 KiB", "mremap the last 2 MiB"].iter().enumerate() {
        let mut t: Vec<f64> = runs.iter().map(|r| r[k].seconds).collect();
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        let c = runs[0][k];
        println!(
            "{what:>22}: {:8.3} ms ({:.3}x memcpy of the buffer), {:7.2} MiB copied home, {} blocks kept on the \
             device (median of {repeat})",
            med * 1e3,
            med / memcpy,
            c.bytes_home as f64 / f64::from(1 << 20),
            c.kept,
        );
    }
    Ok(())
}
