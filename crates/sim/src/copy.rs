//! Copy engines: threads that execute copy-engine operations in pieces of at most 2 MiB,
//! pulled from one shared queue so a batch spreads over every engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use hetmm_core::device::{Completion, CopyOp, DeviceError, HostAddr, PeerAddr, PhysAddr};
use std::sync::{Condvar, Mutex};

use crate::memory::PhysMem;
use crate::sync::{lock, wait_until};

/// Largest piece one engine executes at a time: small enough that one 2 MiB block spreads over
/// every engine.
pub const PIECE: u64 = 256 << 10;

/// Bytes moved, by direction.
#[derive(Debug, Default)]
pub struct CopyCounters {
    pub(crate) h2d: AtomicU64,
    pub(crate) d2h: AtomicU64,
    pub(crate) d2d: AtomicU64,
    pub(crate) peer: AtomicU64,
    pub(crate) zero: AtomicU64,
    pub(crate) ops: AtomicU64,
    pub(crate) batches: AtomicU64,
}

/// Waiting uses std's futex-based primitives, not `parking_lot` (see `crate::sync`).
#[derive(Debug)]
struct BatchState {
    progress: Mutex<(usize, Option<DeviceError>)>,
    done: Condvar,
}

impl BatchState {
    fn finish(&self, r: Result<(), DeviceError>) {
        let mut p = lock(&self.progress);
        p.0 -= 1;
        if let Err(e) = r {
            p.1.get_or_insert(e);
        }
        if p.0 == 0 {
            self.done.notify_all();
        }
    }
}

/// One piece of work for an engine. Dropped unexecuted (device torn down), it completes its
/// batch with [`DeviceError::Shutdown`].
#[derive(Debug)]
pub(crate) struct Piece {
    op: CopyOp,
    batch: Option<Arc<BatchState>>,
}

impl Drop for Piece {
    fn drop(&mut self) {
        if let Some(b) = self.batch.take() {
            b.finish(Err(DeviceError::Shutdown));
        }
    }
}

/// A message to the engines.
#[derive(Debug)]
pub(crate) enum EngineMsg {
    /// Execute.
    Run(Piece),
    /// Exit.
    Stop,
}

/// The completion of one batch.
#[derive(Debug)]
pub struct CopyCompletion {
    state: Arc<BatchState>,
}

impl Completion for CopyCompletion {
    fn wait(&mut self, timeout: Duration) -> Result<(), DeviceError> {
        let deadline = crate::sync::deadline_after(timeout);
        let (p, done) = wait_until(&self.state.done, lock(&self.state.progress), deadline, |p| p.0 == 0);
        if !done {
            return Err(DeviceError::Timeout(timeout));
        }
        match &p.1 {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

fn check_host(addr: HostAddr, len: u64) -> Result<(), DeviceError> {
    if addr.0 == 0 || (addr.0 as u64).checked_add(len).is_none() {
        return Err(DeviceError::Other(format!("host range {:#x}+{len:#x} is invalid", addr.0)));
    }
    Ok(())
}

/// A peer's memory is another simulated device's arena: a process address, never this device's
/// own arena (a copy within one device is `DeviceToDevice`; a mapping of it is `Device`).
pub(crate) fn check_peer(mem: &PhysMem, addr: PeerAddr, len: u64) -> Result<(), DeviceError> {
    let start = usize::try_from(addr.0).map_err(|_| DeviceError::Other(format!("peer address {:#x}", addr.0)))?;
    check_host(HostAddr(start), len)?;
    let own = mem.base_addr()..mem.base_addr() + mem.len();
    if addr.0 < own.end && addr.0 + len > own.start {
        return Err(DeviceError::Other(format!("peer range {:#x}+{len:#x} is this device's own memory", addr.0)));
    }
    Ok(())
}

/// Validates every op of a batch against the memory, before anything is queued.
pub(crate) fn validate(mem: &PhysMem, ops: &[CopyOp]) -> Result<(), DeviceError> {
    for op in ops {
        match *op {
            CopyOp::HostToDevice { src, dst: PhysAddr(d), len } => {
                check_host(src, len)?;
                mem.check(d, len)?;
            }
            CopyOp::DeviceToHost { src: PhysAddr(s), dst, len } => {
                mem.check(s, len)?;
                check_host(dst, len)?;
            }
            CopyOp::DeviceToDevice { src: PhysAddr(s), dst: PhysAddr(d), len } => {
                mem.check(s, len)?;
                mem.check(d, len)?;
                // The engines run an op's pieces in any order: no memmove across them.
                if s < d + len && d < s + len {
                    return Err(DeviceError::BadPhysical { addr: d, len });
                }
            }
            CopyOp::PeerToDevice { src, dst: PhysAddr(d), len } => {
                check_peer(mem, src, len)?;
                mem.check(d, len)?;
            }
            CopyOp::Zero { dst: PhysAddr(d), len } => mem.check(d, len)?,
        }
    }
    Ok(())
}

/// The sub-op of `op` covering bytes `[off, off + n)`.
fn cut(op: &CopyOp, off: u64, n: u64) -> CopyOp {
    match *op {
        CopyOp::HostToDevice { src, dst, .. } => {
            CopyOp::HostToDevice { src: HostAddr(src.0 + off as usize), dst: PhysAddr(dst.0 + off), len: n }
        }
        CopyOp::DeviceToHost { src, dst, .. } => {
            CopyOp::DeviceToHost { src: PhysAddr(src.0 + off), dst: HostAddr(dst.0 + off as usize), len: n }
        }
        CopyOp::DeviceToDevice { src, dst, .. } => {
            CopyOp::DeviceToDevice { src: PhysAddr(src.0 + off), dst: PhysAddr(dst.0 + off), len: n }
        }
        CopyOp::PeerToDevice { src, dst, .. } => {
            CopyOp::PeerToDevice { src: PeerAddr(src.0 + off), dst: PhysAddr(dst.0 + off), len: n }
        }
        CopyOp::Zero { dst, .. } => CopyOp::Zero { dst: PhysAddr(dst.0 + off), len: n },
    }
}

/// Queues a validated batch; returns its completion.
pub(crate) fn submit(
    tx: &Sender<EngineMsg>,
    ops: &[CopyOp],
    counters: &CopyCounters,
) -> Result<CopyCompletion, DeviceError> {
    let pieces: usize = ops.iter().map(|o| o.len().div_ceil(PIECE) as usize).sum();
    let state = Arc::new(BatchState { progress: Mutex::new((pieces, None)), done: Condvar::new() });
    counters.batches.fetch_add(1, Ordering::Relaxed);
    for op in ops {
        let len = op.len();
        let mut off = 0;
        while off < len {
            let n = (len - off).min(PIECE);
            let piece = Piece { op: cut(op, off, n), batch: Some(state.clone()) };
            // A send fails only when every engine is gone; the piece then completes with
            // `Shutdown` as it drops.
            let _ = tx.send(EngineMsg::Run(piece));
            off += n;
        }
    }
    Ok(CopyCompletion { state })
}

/// Executes one piece.
///
/// # Safety
///
/// Host addresses in `op` must be valid per [`hetmm_core::device::DeviceMmu::copy`]'s contract.
unsafe fn execute(mem: &PhysMem, op: &CopyOp, c: &CopyCounters) -> Result<(), DeviceError> {
    match *op {
        CopyOp::HostToDevice { src, dst, len } => {
            // SAFETY: the source is valid host memory per the caller's contract.
            unsafe { mem.copy_from_host(src.0, dst.0, len)? };
            c.h2d.fetch_add(len, Ordering::Relaxed);
        }
        CopyOp::DeviceToHost { src, dst, len } => {
            // SAFETY: the destination is valid host memory per the caller's contract.
            unsafe { mem.copy_to_host(src.0, dst.0, len)? };
            c.d2h.fetch_add(len, Ordering::Relaxed);
        }
        CopyOp::DeviceToDevice { src, dst, len } => {
            mem.copy_within(src.0, dst.0, len)?;
            c.d2d.fetch_add(len, Ordering::Relaxed);
        }
        CopyOp::PeerToDevice { src, dst, len } => {
            // SAFETY: the source is another simulated device's arena (checked disjoint from this
            // one in `validate`), holding the data until the completion per the caller's contract.
            unsafe { mem.copy_from_host(src.0 as usize, dst.0, len)? };
            c.peer.fetch_add(len, Ordering::Relaxed);
        }
        CopyOp::Zero { dst, len } => {
            mem.zero(dst.0, len)?;
            c.zero.fetch_add(len, Ordering::Relaxed);
        }
    }
    c.ops.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// An engine's thread body: runs pieces until told to stop. `stopping` makes remaining
/// pieces fail fast with `Shutdown`.
pub(crate) fn engine_loop(
    mem: &PhysMem,
    rx: &Receiver<EngineMsg>,
    counters: &CopyCounters,
    stopping: &std::sync::atomic::AtomicBool,
) {
    while let Ok(msg) = rx.recv() {
        match msg {
            EngineMsg::Stop => break,
            EngineMsg::Run(mut piece) => {
                let Some(batch) = piece.batch.take() else { continue };
                let r = if stopping.load(Ordering::Relaxed) {
                    Err(DeviceError::Shutdown)
                } else {
                    // SAFETY: the op's host addresses were promised valid until the batch's
                    // completion is waited on, which cannot happen before `finish` below.
                    unsafe { execute(mem, &piece.op, counters) }
                };
                batch.finish(r);
            }
        }
    }
}
