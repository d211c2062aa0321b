//! What taking a 2 MiB block away from the CPU costs, beside what copying it costs: the two
//! operations the device-fault path does per block of CPU-written data (`stream`'s A is
//! write-protected, since the device gets a read-only duplicate; its B is zapped, since the
//! device writes it).
//!
//! Per 2 MiB of mapped 4 KiB shmem pages, medians over a 256 MiB region:
//! - `MADV_DONTNEED` of the application view, not registered with userfaultfd;
//! - the same, registered (MISSING|MINOR|WP) with `EVENT_REMOVE`, a reader thread draining the
//!   REMOVE events (the kernel blocks the madvise until its event is read);
//! - moving the registered view's entries out with `mremap(MREMAP_DONTUNMAP)` (a REMAP event
//!   each), and freeing them afterwards as hetmm's reaper thread does (unregister, unmap);
//! - moving the registered view's entries into the alias instead (hetmm's default for large
//!   revokes): out to a reservation, unregistered there, made writable and moved into the
//!   alias; then the block copied out through the entries it now has;
//! - `UFFDIO_WRITEPROTECT` of the registered view, and `UFFDIO_CONTINUE` mapping it again;
//! - copying 2 MiB of freshly written backing through the alias with the sim's DMA routine
//!   (the alias has no entries: it faults every 16 pages), into page-aligned memory as device
//!   memory is.
//!
//! `cargo run --release --example revoke_cost`

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hetmm::core::types::{VaRange, PAGE_SIZE};
use hetmm_host::mapping::SharedMapping;
use hetmm_host::uffd::{self, Features, RegisterMode, Uffd};

const BLOCK: u64 = 2 << 20;
const LEN: u64 = 256 << 20;

fn median_us(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

/// A region whose backing is written (pwrite, as the CPU's data would be).
fn written() -> SharedMapping {
    let m = SharedMapping::new(LEN).expect("memfd region");
    let buf = vec![1u8; BLOCK as usize];
    for off in (0..LEN).step_by(BLOCK as usize) {
        m.write_backing(off, &buf).expect("pwrite");
    }
    m
}

/// Times `op` on each 2 MiB block of `m`'s application view.
fn per_block(m: &SharedMapping, mut op: impl FnMut(VaRange)) -> Vec<Duration> {
    let base = m.app_range().start;
    (0..LEN / BLOCK)
        .map(|i| {
            let r = VaRange::new(base + i * BLOCK, BLOCK);
            let t = Instant::now();
            op(r);
            t.elapsed()
        })
        .collect()
}

/// A page-aligned 2 MiB destination, as device memory is (a destination a few bytes off its
/// source's page offset copies 3x slower: 4 KiB aliasing).
struct Dst(Vec<u8>, usize);

impl Dst {
    fn new() -> Dst {
        let mut v = vec![2u8; BLOCK as usize + PAGE_SIZE as usize];
        let skip = v.as_mut_ptr().align_offset(PAGE_SIZE as usize);
        Dst(v, skip)
    }

    fn buf(&mut self) -> &mut [u8] {
        &mut self.0[self.1..self.1 + BLOCK as usize]
    }
}

/// Median time to copy each 2 MiB block of `m` out through its alias with the sim's DMA routine.
fn copy_all(m: &SharedMapping, dst: &mut Dst) -> f64 {
    median_us(
        (0..LEN / BLOCK)
            .map(|i| {
                let t = Instant::now();
                m.read_alias_with(i * BLOCK, dst.buf(), hetmm::sim::dma_copy).expect("copy");
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    // Not registered: a read of each page maps it (no userfaultfd involved).
    let plain = written();
    let app = plain.app_range();
    for va in (app.start..app.end()).step_by(PAGE_SIZE as usize) {
        plain.touch_app(va).expect("touch");
    }
    let zap_plain = median_us(per_block(&plain, |r| plain.zap_app(r).expect("zap")));
    drop(plain);

    // Registered, with a reader for the REMOVE events.
    let reg = written();
    let events = Features::EVENT_REMOVE | Features::EVENT_REMAP | Features::EVENT_UNMAP;
    let u = Uffd::open(Features::REQUIRED, events).expect("userfaultfd");
    assert!(u.features().contains(events), "kernel lacks EVENT_REMOVE/REMAP/UNMAP");
    // SAFETY: the view of the example's own mapping; the example serves it (its pages are all
    // written, so nothing waits on a fault) and nothing else refers to it.
    unsafe { u.register(reg.app_range(), RegisterMode::MISSING | RegisterMode::MINOR | RegisterMode::WP) }
        .expect("register");
    let stop = AtomicBool::new(false);
    let mut dst = Dst::new();
    let (wp, zap_reg, moved, freed, cont, into) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut msgs = vec![uffd::empty_msg(); 64];
            while !stop.load(Ordering::Relaxed) {
                if u.poll(Duration::from_millis(50)).unwrap_or(false) {
                    let _ = u.read_msgs(&mut msgs);
                }
            }
        });
        per_block(&reg, |r| u.cont(r, false, false).expect("UFFDIO_CONTINUE"));
        let wp = median_us(per_block(&reg, |r| u.writeprotect(r, true, true).expect("UFFDIO_WRITEPROTECT")));
        let zap = median_us(per_block(&reg, |r| reg.zap_app(r).expect("zap")));
        // Mapped again, then the entries moved out, then freed as the reaper does.
        let cont = median_us(per_block(&reg, |r| u.cont(r, false, false).expect("UFFDIO_CONTINUE")));
        let mut out = Vec::new();
        let moved = median_us(per_block(&reg, |r| out.push(reg.move_out_app(r).expect("move out"))));
        let freed = median_us(
            out.into_iter()
                .map(|m| {
                    let t = Instant::now();
                    u.unregister(m.moved()).expect("unregister");
                    drop(m);
                    t.elapsed()
                })
                .collect(),
        );
        // Mapped again, then moved into the alias (which has no entries: nothing copied from
        // it yet) as hetmm's revoke does, and copied out through the moved entries.
        per_block(&reg, |r| u.cont(r, false, false).expect("UFFDIO_CONTINUE"));
        let into = per_block(&reg, |r| {
            let moved = reg.move_out_app(r).expect("move out");
            u.unregister(moved.moved()).expect("unregister");
            // SAFETY: `moved` came from `move_out_app(r)` and was just unregistered; this thread
            // is the only one touching the mapping.
            unsafe { reg.install_in_alias(moved, r) }.expect("move into the alias");
        });
        let copy_moved = copy_all(&reg, &mut dst);
        // Unregistered before the reader stops: unmapping the view raises no UNMAP event then.
        u.unregister(reg.app_range()).expect("unregister");
        stop.store(true, Ordering::Relaxed);
        (wp, zap, moved, freed, cont, (median_us(into), copy_moved))
    });
    drop(reg);

    let copy = copy_all(&written(), &mut dst);
    println!("per 2 MiB of 4 KiB shmem pages (medians of {} blocks):", LEN / BLOCK);
    println!("  MADV_DONTNEED, not registered           {zap_plain:7.1} us");
    println!("  MADV_DONTNEED, registered, EVENT_REMOVE {zap_reg:7.1} us");
    println!("  mremap(DONTUNMAP) out, EVENT_REMAP       {moved:7.1} us");
    println!("    then unregister + munmap (the reaper)  {freed:7.1} us");
    println!("  UFFDIO_WRITEPROTECT                     {wp:7.1} us");
    println!("  UFFDIO_CONTINUE (mapping it again)      {cont:7.1} us");
    println!("  copy from fresh backing (sim DMA)       {copy:7.1} us");
    println!("  zap / copy {:.2}, write-protect / copy {:.2}", zap_reg / copy, wp / copy);
    let (into, copy_moved) = into;
    println!("  move out, unregister, into the alias    {into:7.1} us");
    println!("    then copy through the moved entries   {copy_moved:7.1} us");
    println!(
        "  revoke + copy: zapping {:.1} us, moving into the alias {:.1} us ({:.2})",
        zap_reg + copy,
        into + copy_moved,
        (into + copy_moved) / (zap_reg + copy)
    );
}
