//! What a change to a small part of device-resident memory costs: the program registers a
//! buffer, a simulated device takes all of it (again before each change), and then the program
//! - `protect`s one 4 KiB page read-only,
//! - `protect`s the buffer's first quarter read-only,
//! - `munmap`s another 4 KiB page,
//! - `mremap`s the buffer's last quarter to a new address a multiple of 2 MiB away,
//! - and on to another address a multiple of 2 MiB and one 4 KiB page away.
//!
//! Each change is timed from the call until hetmm has applied it (`settle`), with the bytes it
//! copied home and the blocks it left on the device. memcpy of the whole buffer is measured in
//! the same run for scale. Every byte is checked at the end, at its new address where it moved.
//!
//! `cargo run --release --example reshape_cost -- [SIZE] [REPEAT] [MAPPINGS]` (default 256M 5 0).
//! `MAPPINGS` other mappings (4 KiB each, alternately read-only so that none merge) are made
//! first: applying an unmap or a move reads `/proc/self/maps` in places, whose cost grows with
//! the number of mappings the process has.

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

/// Unmaps `[start, start + len)` except `[hole, hole + hole_len)` inside it.
///
/// # Safety
///
/// The caller owns the mappings there, and nothing refers to them any more.
unsafe fn unmap_around(start: *mut libc::c_void, len: usize, hole: *mut libc::c_void, hole_len: usize) {
    let (s, h) = (start as usize, hole as usize);
    // SAFETY: the caller's promise, for the parts before and after the hole.
    unsafe {
        libc::munmap(start, h - s);
        libc::munmap((h + hole_len) as *mut _, s + len - (h + hole_len));
    }
}

/// Migrates `ranges` (start, length) to `to`, region by region (a change splits its region).
fn to_device(hm: &Hetmm, to: hetmm::Place, ranges: &[(u64, u64)]) -> Result<(), hetmm::Error> {
    for &(start, len) in ranges {
        for part in hm.space().span_parts(start, len)? {
            hm.migrate(part.start, part.len, to)?;
        }
    }
    Ok(())
}

/// One run in a fresh address space, with `extra` other mappings: the costs of the protect, the
/// munmap and the two mremaps.
fn run(size: usize, extra: usize) -> Result<[Cost; 5], Box<dyn std::error::Error>> {
    let hm = Hetmm::new()?;
    let dev = hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 2 * size as u64, ..SimConfig::default() })?)?;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // The buffer, 2 MiB aligned, and a reserved hole, 2 MiB aligned, for the first mremap to
    // land in.
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), size + 2 * BLOCK, rw, anon, -1, 0) };
    assert_ne!(raw, libc::MAP_FAILED, "mmap of {size} bytes");
    let p = (raw as usize).next_multiple_of(BLOCK) as *mut u8;
    let quarter = size / 4;
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let reserved = unsafe { libc::mmap(std::ptr::null_mut(), quarter + BLOCK, libc::PROT_NONE, anon, -1, 0) };
    assert_ne!(reserved, libc::MAP_FAILED, "mmap of the hole");
    let hole = (reserved as usize).next_multiple_of(BLOCK) as *mut libc::c_void;
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let reserved2 = unsafe { libc::mmap(std::ptr::null_mut(), quarter + 2 * BLOCK, libc::PROT_NONE, anon, -1, 0) };
    assert_ne!(reserved2, libc::MAP_FAILED, "mmap of the second hole");
    let hole2 = ((reserved2 as usize).next_multiple_of(BLOCK) + PAGE) as *mut libc::c_void;
    // Made after the buffer, so that the kernel places them below it: `/proc/self/maps` lists them
    // before it.
    let _others = other_mappings(extra)?;
    // SAFETY: `p..p + size` lies inside the mapping made above, which nothing else uses.
    let buf = unsafe { std::slice::from_raw_parts_mut(p, size) };
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(i);
    }
    hm.register(p, size)?;
    hm.migrate(p as u64, size as u64, dev.proc())?;
    let protected = size / 2 + 5 * PAGE;
    let unmapped = size / 4 + 9 * PAGE;
    let moved = size - quarter;
    let protect_page =
        timed(&hm, || hm.protect(p as u64 + protected as u64, PAGE as u64, Prot::READ).expect("protect"))?;
    // Each change finds the whole buffer on the device.
    to_device(&hm, dev.proc(), &[(p as u64, size as u64)])?;
    let protect_quarter =
        timed(&hm, || hm.protect(p as u64, quarter as u64, Prot::READ).expect("protect of a quarter"))?;
    to_device(&hm, dev.proc(), &[(p as u64, size as u64)])?;
    let munmap = timed(&hm, || {
        // SAFETY: one page of the buffer, which this function owns; it is not touched again.
        assert_eq!(unsafe { libc::munmap(p.add(unmapped).cast(), PAGE) }, 0);
    })?;
    let after = (unmapped + PAGE) as u64;
    to_device(&hm, dev.proc(), &[(p as u64, unmapped as u64), (p as u64 + after, size as u64 - after)])?;
    let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    let away = timed(&hm, || {
        // SAFETY: the buffer's last quarter moves onto the reserved hole, which nothing else uses.
        let q = unsafe { libc::mremap(p.add(moved).cast(), quarter, quarter, flags, hole) };
        assert_eq!(q, hole, "mremap");
    })?;
    to_device(&hm, dev.proc(), &[(hole as u64, quarter as u64)])?;
    let shifted = timed(&hm, || {
        // SAFETY: the quarter moves onto the second reserved hole, which nothing else uses.
        let q = unsafe { libc::mremap(hole, quarter, quarter, flags, hole2) };
        assert_eq!(q, hole2, "mremap on");
    })?;
    for (i, b) in buf[..moved].iter().enumerate() {
        if !(unmapped..unmapped + PAGE).contains(&i) {
            assert_eq!(*b, pattern(i), "byte {i}");
        }
    }
    // SAFETY: the moved quarter now lives at `hole2`.
    let tail = unsafe { std::slice::from_raw_parts(hole2 as *const u8, quarter) };
    for (i, b) in tail.iter().enumerate() {
        assert_eq!(*b, pattern(moved + i), "moved byte {i}");
    }
    hm.unregister(p, unmapped)?;
    hm.unregister(p.wrapping_add(unmapped + PAGE), moved - unmapped - PAGE)?;
    hm.unregister(hole2 as *const u8, quarter)?;
    // SAFETY: every part was unregistered; the mappings are this function's own, except the
    // holes the moves left (a thread started since may have its stack there), which stay.
    unsafe {
        unmap_around(raw, size + 2 * BLOCK, p.add(moved).cast(), quarter);
        unmap_around(reserved, quarter + BLOCK, hole, quarter);
        libc::munmap(reserved2, quarter + 2 * BLOCK);
    }
    Ok([protect_page, protect_quarter, munmap, away, shifted])
}

/// `n` anonymous 4 KiB mappings, every other one read-only so that the kernel keeps them apart
/// (they live until dropped).
fn other_mappings(n: usize) -> Result<Vec<Box<dyn std::any::Any>>, std::io::Error> {
    (0..n)
        .map(|i| -> Result<Box<dyn std::any::Any>, std::io::Error> {
            let m = memmap2::MmapMut::map_anon(PAGE)?;
            Ok(if i % 2 == 0 { Box::new(m.make_read_only()?) } else { Box::new(m) })
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size = args.next().and_then(|s| hetmm::parse_size(&s)).unwrap_or(256 << 20) as usize;
    let size = size.next_multiple_of(BLOCK).max(4 * BLOCK);
    let repeat: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5).max(1);
    let extra: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let runs = (0..repeat).map(|_| run(size, extra)).collect::<Result<Vec<_>, _>>()?;
    let memcpy = size as f64 / hetmm::host::probe::memcpy_bandwidth(size, 5);
    println!(
        "buffer {} MiB on the sim device, {extra} other mappings; memcpy of it {:.2} ms (same run)",
        size >> 20,
        memcpy * 1e3
    );
    let whats = [
        "protect 4 KiB",
        "protect a quarter",
        "munmap 4 KiB",
        "mremap a quarter, 2 MiB steps",
        "mremap it on, 2 MiB steps + 4 KiB",
    ];
    for (k, what) in whats.iter().enumerate() {
        let mut t: Vec<f64> = runs.iter().map(|r| r[k].seconds).collect();
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        let c = runs[0][k];
        println!(
            "{what:>34}: {:8.3} ms ({:.3}x memcpy of the buffer), {:7.2} MiB copied home, {} blocks kept on the \
             device (median of {repeat})",
            med * 1e3,
            med / memcpy,
            c.bytes_home as f64 / f64::from(1 << 20),
            c.kept,
        );
    }
    Ok(())
}
