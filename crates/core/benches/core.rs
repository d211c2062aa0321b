//! The core's own cost, with fakes: a CPU whose page-table calls do nothing (`fakes::PlainCpu`)
//! and devices that neither copy nor keep page tables. What is left is hetmm's bookkeeping on its
//! hot paths (residency selection, page state, physical allocation, batching, locking, threads),
//! the part a refactor can slow down without any benchmark on real memory noticing.
//!
//! `cargo bench -p hetmm-core` (criterion; `-- --quick` for a short run). Throughput is in bytes
//! of data whose pages the operation covered.
//!
//! - `migrate_1g`: an explicit migration of 1 GiB of CPU-written data to a device that maps
//!   only whole 2 MiB chunks and cannot fault (as CUDA's), and back home: the pipelined bulk
//!   passes of `prefetch_range`. `migrate_2m`: one block the CPU
//!   has mapped goes there, and a CPU fault brings it back.
//! - `device_faults`: a replayable device faults once on every 2 MiB block of 64 MiB, in one
//!   batch; the core's fault thread services them all (whole-block migration) and replays.
//! - `cpu_fault`: the CPU touches a 2 MiB block that lives on a device (as CUDA's): one fault
//!   brings the block home.
//! - `buddy`: device physical memory, a 2 MiB chunk and 512 single pages allocated and freed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hetmm_core::alloc::BuddyAllocator;
use hetmm_core::cpu::CpuFaultHandler;
use hetmm_core::device::*;
use hetmm_core::fakes::PlainCpu;
use hetmm_core::types::*;
use hetmm_core::{AddressSpace, AttachOptions, CoreConfig};
use parking_lot::{Condvar, Mutex};

/// Where the fake regions start (any 2 MiB-aligned address: nothing is mapped there).
const BASE: u64 = 0x40_0000_0000;

/// A device with `bytes` of memory that copies nothing and keeps no page table. With
/// `replayable`, [`NullDevice::fault_until`] raises faults for the core's fault thread and
/// waits for their service.
#[derive(Debug)]
struct NullDevice {
    bytes: u64,
    /// Replayable faults and 4 KiB pages (the simulated GPU), or neither (CUDA: 2 MiB chunks
    /// only, memory made resident before launches).
    replayable: bool,
    queue: Mutex<Vec<DeviceFault>>,
    queued: Condvar,
    replays: Mutex<u64>,
    replayed: Condvar,
}

impl NullDevice {
    fn new(bytes: u64, replayable: bool) -> Arc<NullDevice> {
        Arc::new(NullDevice {
            bytes,
            replayable,
            queue: Mutex::new(Vec::new()),
            queued: Condvar::new(),
            replays: Mutex::new(0),
            replayed: Condvar::new(),
        })
    }

    /// Raises `faults` and waits (bounded) for a replay after which `done` holds. As a device's
    /// clients would, the faults are raised again after a replay that left work undone (the
    /// core discards faults that queue up while it services a batch: their clients retry).
    fn fault_until(&self, faults: &[DeviceFault], done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = *self.replays.lock();
        loop {
            self.queue.lock().extend_from_slice(faults);
            self.queued.notify_all();
            let mut r = self.replays.lock();
            while *r == seen {
                assert!(!self.replayed.wait_until(&mut r, deadline).timed_out(), "the core never serviced the faults");
            }
            seen = *r;
            drop(r);
            if done() {
                return;
            }
        }
    }
}

impl DeviceMmu for NullDevice {
    fn caps(&self) -> DeviceCaps {
        DeviceCaps {
            name: "null".into(),
            page_sizes: if self.replayable { PAGE_SIZE | BLOCK_SIZE } else { BLOCK_SIZE },
            replayable_faults: self.replayable,
            coherent: false,
            remote_host_access: false,
            peer: None,
            region_bound: false,
            memory_bytes: self.bytes,
        }
    }
    fn physical_ranges(&self) -> Vec<(PhysAddr, u64)> {
        vec![(PhysAddr(0), self.bytes)]
    }
    fn create_page_table(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    unsafe fn destroy_page_table(&self) {}
    unsafe fn map(&self, _: &[MapEntry]) -> Result<(), DeviceError> {
        Ok(())
    }
    fn unmap(&self, _: &[VaRange]) -> Result<(), DeviceError> {
        Ok(())
    }
    fn protect(&self, _: &[(VaRange, Prot)]) -> Result<(), DeviceError> {
        Ok(())
    }
    fn invalidate_tlb(&self, _: &[VaRange]) {}
    unsafe fn copy(&self, _: &[CopyOp]) -> Result<Box<dyn Completion>, DeviceError> {
        Ok(Box::new(Done))
    }
    fn fetch_faults(&self, max: usize, out: &mut Vec<DeviceFault>) -> usize {
        let mut q = self.queue.lock();
        let n = q.len().min(max);
        out.extend(q.drain(..n));
        n
    }
    fn wait_for_faults(&self, timeout: Duration) -> bool {
        let mut q = self.queue.lock();
        if q.is_empty() {
            let _ = self.queued.wait_for(&mut q, timeout);
        }
        !q.is_empty()
    }
    fn replay(&self, _: &[(u64, hetmm_core::types::Access, FaultCancel)]) {
        *self.replays.lock() += 1;
        self.replayed.notify_all();
    }
    fn shutdown_faults(&self) {
        self.queued.notify_all();
    }
}

/// An address space with one region of `len` bytes the CPU has written (one fault per block)
/// and one device of `dev_bytes`.
fn world(len: u64, dev_bytes: u64, replayable: bool) -> (Arc<AddressSpace>, Arc<NullDevice>, DeviceId) {
    let space = AddressSpace::new(CoreConfig::default());
    space.add_region(Arc::new(PlainCpu::new(VaRange::new(BASE, len))), Prot::READ | Prot::WRITE).expect("region");
    for b in 0..len / BLOCK_SIZE {
        space.cpu_fault(BASE + b * BLOCK_SIZE, Access::Write).expect("CPU first touch");
    }
    let dev = NullDevice::new(dev_bytes, replayable);
    let id = space.attach(Arc::clone(&dev) as Arc<dyn DeviceMmu>, AttachOptions::default()).expect("attach");
    (space, dev, id)
}

fn migrate_1g(c: &mut Criterion) {
    let len = 1u64 << 30;
    let (space, _dev, id) = world(len, len, false);
    let mut g = c.benchmark_group("migrate_1g");
    g.throughput(Throughput::Bytes(len)).sample_size(10);
    g.bench_function("to_device", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let s = Instant::now();
                space.migrate(BASE, len, Proc::Device(id)).expect("to the device");
                t += s.elapsed();
                space.migrate(BASE, len, Proc::Cpu).expect("home");
            }
            t
        })
    });
    g.bench_function("home", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                space.migrate(BASE, len, Proc::Device(id)).expect("to the device");
                let s = Instant::now();
                space.migrate(BASE, len, Proc::Cpu).expect("home");
                t += s.elapsed();
            }
            t
        })
    });
    g.finish();
    // One block the CPU has mapped, as a launch that uses one small buffer migrates it; the
    // CPU's fault brings it back.
    let mut g = c.benchmark_group("migrate_2m");
    g.throughput(Throughput::Bytes(BLOCK_SIZE));
    g.bench_function("to_device_and_cpu_fault_home", |b| {
        b.iter(|| {
            space.migrate(BASE, BLOCK_SIZE, Proc::Device(id)).expect("to the device");
            space.cpu_fault(BASE, Access::Write).expect("CPU fault");
        })
    });
    g.finish();
    space.shutdown();
}

fn device_faults(c: &mut Criterion) {
    let len = 64u64 << 20;
    let (space, dev, id) = world(len, 2 * len, true);
    let faults: Vec<DeviceFault> = (0..len / BLOCK_SIZE)
        .map(|b| DeviceFault { va: BASE + b * BLOCK_SIZE, access: Access::Write, client: b as u32 })
        .collect();
    let blocks = len / BLOCK_SIZE;
    let on_device = || {
        (0..blocks).all(|b| {
            space.page_state(BASE + b * BLOCK_SIZE).is_some_and(|p| p.resident == ProcMask::only(Proc::Device(id)))
        })
    };
    let mut g = c.benchmark_group("device_faults");
    g.throughput(Throughput::Bytes(len));
    g.bench_function("64m_one_per_block", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                space.migrate(BASE, len, Proc::Cpu).expect("home");
                let s = Instant::now();
                dev.fault_until(&faults, on_device);
                t += s.elapsed();
            }
            t
        })
    });
    g.finish();
    space.shutdown();
}

fn cpu_fault(c: &mut Criterion) {
    let len = 64u64 << 20;
    let (space, _dev, id) = world(len, len, false);
    let mut g = c.benchmark_group("cpu_fault");
    g.throughput(Throughput::Bytes(BLOCK_SIZE));
    let mut block = 0;
    g.bench_function("2m_block_home", |b| {
        b.iter_batched(
            || {
                // Not in address order: sequential faults would start the CPU read-ahead.
                block = (block + 7) % (len / BLOCK_SIZE);
                let va = BASE + block * BLOCK_SIZE;
                space.migrate(va, BLOCK_SIZE, Proc::Device(id)).expect("to the device");
                va
            },
            |va| space.cpu_fault(va, Access::Write).expect("CPU fault"),
            BatchSize::PerIteration,
        )
    });
    g.finish();
    space.shutdown();
}

fn buddy(c: &mut Criterion) {
    let mut a = BuddyAllocator::new(&[(PhysAddr(0), 1 << 30)]);
    let mut g = c.benchmark_group("buddy");
    g.throughput(Throughput::Bytes(BLOCK_SIZE));
    g.bench_function("chunk", |b| {
        b.iter(|| {
            let pa = a.alloc(9).expect("free chunk");
            assert!(a.free(pa, 512));
        })
    });
    let mut pages = Vec::with_capacity(512);
    g.bench_function("512_pages", |b| {
        b.iter(|| {
            pages.extend((0..512).map(|_| a.alloc(0).expect("free page")));
            for pa in pages.drain(..) {
                assert!(a.free(pa, 1));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, migrate_1g, device_faults, cpu_fault, buddy);
criterion_main!(benches);
