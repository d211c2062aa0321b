//! Hints (GMEM's `hmadvise`, CUDA's `cudaMemAdvise`/`cudaMemPrefetchAsync`): prefetch in bulk and
//! asynchronously, discard, preferred location, read duplication, accessed-by, pinning.
//! Attributes live in the address space's [`crate::attrs::RangeAttrs`]; the residency decision
//! (`policy::select_residency`) and the evictor consult them.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{CoreError, Result};
use crate::space::AddressSpace;
use crate::types::{DeviceId, Proc, VaRange};

/// A hint about a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// Move the range to this processor now, in bulk, asynchronously (on a read-mostly range a
    /// device gets a read-only copy instead). Wait on the returned [`Pending`].
    Prefetch(Proc),
    /// Drop the data everywhere; the next touch reads zeros. Pages a device refuses to unmap keep
    /// their data everywhere (the device could still reach them), and the refusal is returned.
    DontNeed,
    /// Where the data should live (`None` clears it).
    PreferredLocation(Option<Proc>),
    /// Read duplication on (`true`) or off: readers get their own copies; the first write
    /// collapses them to the writer.
    ReadMostly(bool),
    /// Keep a mapping on this device wherever the data lives (remote access instead of
    /// migration), or stop (`false`).
    AccessedBy(DeviceId, bool),
    /// Never evict the range while pinned (`true`), or allow it again. Eviction works on whole
    /// 2 MiB blocks (the unit of device memory), so a pinned page keeps its whole block on the
    /// device: pins held on many blocks can leave a small device with nothing to evict.
    Pin(bool),
}

/// Completion of an advice: immediate for attribute changes, a background migration for
/// [`Advice::Prefetch`].
#[derive(Debug)]
pub struct Pending {
    rx: Option<mpsc::Receiver<Result<()>>>,
}

impl Pending {
    pub(crate) fn done() -> Self {
        Pending { rx: None }
    }

    /// Waits until the advice has taken effect, at most `timeout`.
    pub fn wait(self, timeout: Duration) -> Result<()> {
        match self.rx {
            None => Ok(()),
            Some(rx) => match rx.recv_timeout(timeout) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => Err(CoreError::Timeout { what: "prefetch", after: timeout }),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(CoreError::ShuttingDown),
            },
        }
    }
}

impl AddressSpace {
    /// Applies `advice` to `[start, start + len)` (page aligned, shared memory throughout; it
    /// may span adjacent regions). Attribute changes take effect before this returns; a
    /// prefetch runs in the background.
    pub fn advise(self: &Arc<Self>, start: u64, len: u64, advice: Advice) -> Result<Pending> {
        let parts = self.span_parts(start, len)?;
        let range = VaRange::new(start, len);
        match advice {
            Advice::Prefetch(to) => {
                if let Proc::Device(d) = to {
                    self.slot(d)?;
                }
                let (tx, rx) = mpsc::channel();
                let me = Arc::clone(self);
                std::thread::Builder::new()
                    .name("hetmm-prefetch".into())
                    .spawn(move || {
                        let r = me.retrying_races(|| {
                            let _gate = me.enter()?;
                            // As `migrate`: no region may be reshaped meanwhile, and the range is
                            // checked again, for the program may have unmapped part of it since.
                            let _shape = me.reshape.read();
                            for part in me.span_parts(range.start, range.len)? {
                                me.prefetch_range(part, to)?;
                            }
                            Ok(())
                        });
                        let _ = tx.send(r);
                    })
                    .map_err(|_| CoreError::ShuttingDown)?;
                Ok(Pending { rx: Some(rx) })
            }
            Advice::DontNeed => {
                // Every part is tried: pages a device refuses to give up keep their data, the
                // others go; the first refusal is returned.
                let mut dropped = Ok(());
                for part in parts {
                    let r = self.discard_range(part);
                    dropped = dropped.and(r);
                }
                dropped.map(|()| Pending::done())
            }
            Advice::PreferredLocation(p) => {
                if let Some(Proc::Device(d)) = p {
                    self.slot(d)?;
                }
                self.attrs.write().update(range, |a| a.preferred = p);
                Ok(Pending::done())
            }
            Advice::ReadMostly(on) => {
                self.attrs.write().update(range, |a| a.read_mostly = on);
                Ok(Pending::done())
            }
            Advice::AccessedBy(d, on) => {
                self.slot(d)?;
                let p = Proc::Device(d);
                self.attrs
                    .write()
                    .update(range, |a| if on { a.accessed_by.insert(p) } else { a.accessed_by.remove(p) });
                Ok(Pending::done())
            }
            Advice::Pin(on) => {
                self.attrs.write().update(range, |a| a.pinned = on);
                Ok(Pending::done())
            }
        }
    }
}
