//! Everything about the CUDA backend that does not need a GPU: where each shared region lives in
//! device virtual memory, which 2 MiB chunk backs which block, what the device page table
//! holds, how a batch of `DeviceMmu` calls becomes a short list of driver calls, how much
//! device memory hetmm may use, and which host ranges are registered for DMA. The device
//! (`device.rs`) asks this module for a plan, carries it out through `driver.rs`, then commits
//! it here. Every rule is unit-tested on machines without CUDA.

use std::collections::{BTreeMap, HashMap};

use hetmm_core::device::{CopyOp, DeviceError, HostAddr, MapEntry, MapTarget, PhysAddr};
use hetmm_core::types::{align_down, align_up, parse_size, Prot, VaRange, BLOCK_SIZE, PAGE_SIZE};

/// The mapping granularity hetmm needs from the driver: one 2 MiB chunk per logical block.
pub const CHUNK: u64 = BLOCK_SIZE;

/// Device access to a mapped chunk (the driver's `CU_MEM_ACCESS_FLAGS_PROT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Loads only.
    Read,
    /// Loads, stores, atomics.
    ReadWrite,
}

impl Access {
    /// The access a core protection asks for. `None` when it grants nothing (unmap instead).
    pub fn from_prot(p: Prot) -> Option<Access> {
        if p.contains(Prot::WRITE) {
            Some(Access::ReadWrite)
        } else if p.contains(Prot::READ) {
            Some(Access::Read)
        } else {
            None
        }
    }
}

/// Where one shared region lives on the device: its host (application) range and the base of
/// the device virtual-address reservation that mirrors it. The reservation covers the 2 MiB
/// windows the region touches, from the one holding its start (memory a program registers
/// need not start on a 2 MiB boundary; each chunk is mapped whole at its window). When the
/// driver grants the host's own addresses, `dev_base` is that first window and pointers are
/// the same on both sides; otherwise every pointer is shifted by the same multiple of 2 MiB
/// (see [`RegionVa::translate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionVa {
    /// The range the program uses (page aligned).
    pub app: VaRange,
    /// First device virtual address of the reservation, the device side of [`RegionVa::window`].
    pub dev_base: u64,
}

impl RegionVa {
    /// Bytes to reserve on the device for the region `app`: the whole 2 MiB windows it touches.
    pub fn reservation_len(app: VaRange) -> Option<u64> {
        Some(align_up(app.start.checked_add(app.len)?, CHUNK)? - align_down(app.start, CHUNK))
    }

    /// The host address the reservation mirrors from: the 2 MiB window holding the region's
    /// start.
    pub fn window(&self) -> u64 {
        align_down(self.app.start, CHUNK)
    }

    /// Bytes reserved.
    pub fn dev_len(&self) -> u64 {
        Self::reservation_len(self.app).unwrap_or(u64::MAX)
    }

    /// Whether the driver gave the host's own addresses (one pointer works on both sides
    /// without translation).
    pub fn same_address(&self) -> bool {
        self.dev_base == self.window()
    }

    /// The device address of host address `va`, which must lie in the region.
    pub fn translate(&self, va: u64) -> Option<u64> {
        self.app.contains(va).then(|| self.dev_base + (va - self.window()))
    }

    /// The device address a chunk for the window at host address `host_va` is mapped at.
    fn dev_va_of(&self, host_va: u64) -> u64 {
        self.dev_base + (host_va - self.window())
    }

    /// The end of the region in host addresses (a chunk may end there without being whole).
    fn end(&self) -> u64 {
        self.app.end()
    }
}

/// One chunk mapped (or to map, or to unmap) at one 2 MiB window of a region. Two regions may
/// share a window (one ends inside it, the next starts there); each maps its own chunk there in
/// its own reservation, so a mapping is known by its region and window ([`ChunkMap::key`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMap {
    /// Region start (key of the region's reservation).
    pub region: u64,
    /// Host address of the block's 2 MiB window (the block itself may start later in it, at
    /// the region's start).
    pub host_va: u64,
    /// Device address it is mapped at.
    pub dev_va: u64,
    /// Physical chunk index.
    pub chunk: u64,
    /// Access granted.
    pub access: Access,
}

impl ChunkMap {
    /// What the page table knows the mapping by: its region and window.
    pub fn key(&self) -> (u64, u64) {
        (self.region, self.host_va)
    }
}

/// One `cuMemSetAccess` call: a run of mapped device addresses inside one reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessRun {
    /// Region start (key of the region's reservation).
    pub region: u64,
    /// First device address.
    pub dev_va: u64,
    /// Bytes (whole chunks).
    pub len: u64,
    /// Access.
    pub access: Access,
}

/// What one `map` call does: new chunk mappings, then access runs over them (coalesced).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapPlan {
    /// `cuMemMap` calls, one per chunk (the driver maps each allocation handle separately).
    pub maps: Vec<ChunkMap>,
    /// Parked mappings that are exactly what is asked for: taken back into use, no call.
    pub revive: Vec<ChunkMap>,
    /// Parked mappings in the way (at a block being mapped, or of a chunk being mapped
    /// elsewhere): `cuMemUnmap` them first.
    pub drop: Vec<ChunkMap>,
    /// `cuMemSetAccess` calls, contiguous runs merged.
    pub access: Vec<AccessRun>,
}

/// The device page table as the backend keeps it: regions with their reservations, and which
/// chunk is mapped at which block. Only 2 MiB entries exist. Mappings are keyed by
/// [`ChunkMap::key`] (region start, window).
#[derive(Debug, Default)]
pub struct PageTable {
    regions: BTreeMap<u64, RegionVa>,
    mapped: BTreeMap<(u64, u64), ChunkMap>,
    /// Parked: unmapped for hetmm (no launch may use them), still mapped in the driver, so
    /// that mapping the same chunk at the same block again costs no driver call. By key, and
    /// the key of each parked chunk.
    parked: BTreeMap<(u64, u64), ChunkMap>,
    parked_chunk: HashMap<u64, (u64, u64)>,
    /// Parked mappings whose access is unknown (left by a failed batch whose undo failed):
    /// never revived, only removed when in the way.
    stale: std::collections::HashSet<(u64, u64)>,
}

fn bad(start: u64, len: u64) -> DeviceError {
    DeviceError::BadRange(VaRange::new(start, len))
}

impl PageTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a region; refuses one that overlaps a known region (sharing a 2 MiB window is
    /// fine: each has its own reservation).
    pub fn add_region(&mut self, r: RegionVa) -> Result<(), DeviceError> {
        let overlaps = self.regions.values().any(|o| o.app.intersect(&r.app).is_some());
        let aligned = r.app.start.is_multiple_of(PAGE_SIZE) && r.dev_base.is_multiple_of(CHUNK);
        if overlaps || !aligned || r.app.len == 0 || RegionVa::reservation_len(r.app).is_none() {
            return Err(DeviceError::BadRange(r.app));
        }
        self.regions.insert(r.app.start, r);
        Ok(())
    }

    /// The region starting at `start`.
    pub fn region(&self, start: u64) -> Option<&RegionVa> {
        self.regions.get(&start)
    }

    /// The region holding host address `va`.
    pub fn region_of(&self, va: u64) -> Option<&RegionVa> {
        let (_, r) = self.regions.range(..=va).next_back()?;
        r.app.contains(va).then_some(r)
    }

    /// Regions, by start.
    pub fn regions(&self) -> impl Iterator<Item = &RegionVa> {
        self.regions.values()
    }

    /// The device address of host address `va` (`None` outside every region).
    pub fn translate(&self, va: u64) -> Option<u64> {
        self.region_of(va)?.translate(va)
    }

    /// Chunks mapped in the region starting at `start` (to unmap before it goes).
    pub fn mapped_in(&self, start: u64) -> Vec<ChunkMap> {
        self.mapped.values().filter(|m| m.region == start).copied().collect()
    }

    /// Forgets the region starting at `start` (its chunks must have been unmapped).
    pub fn remove_region(&mut self, start: u64) -> Option<RegionVa> {
        self.mapped.retain(|_, m| m.region != start);
        for m in self.parked_in(start) {
            self.unpark(&m);
        }
        self.regions.remove(&start)
    }

    /// Parked chunks of the region starting at `start` (to unmap before it goes).
    pub fn parked_in(&self, start: u64) -> Vec<ChunkMap> {
        self.parked.values().filter(|m| m.region == start).copied().collect()
    }

    /// Every parked chunk.
    pub fn parked(&self) -> impl Iterator<Item = &ChunkMap> {
        self.parked.values()
    }

    /// Parks unmapped chunks (their driver mappings stay; see [`PageTable::plan_map`]).
    pub fn park(&mut self, done: &[ChunkMap]) {
        for m in done {
            self.mapped.remove(&m.key());
            self.parked.insert(m.key(), *m);
            self.parked_chunk.insert(m.chunk, m.key());
        }
    }

    /// Parks a mapping a failed batch left in the driver (its undo failed too): hetmm freed the
    /// chunk, so a later map that needs the block or the chunk must remove it first. Its access
    /// may never have been set, so it is never revived.
    pub fn park_stale(&mut self, m: &ChunkMap) {
        self.park(std::slice::from_ref(m));
        self.stale.insert(m.key());
    }

    /// Whether `m` is parked (as it was planned).
    pub fn is_parked(&self, m: &ChunkMap) -> bool {
        self.parked.get(&m.key()) == Some(m)
    }

    /// Forgets a parked chunk (its driver mapping was removed).
    pub fn unpark(&mut self, m: &ChunkMap) {
        if self.parked.remove(&m.key()).is_some() {
            self.parked_chunk.remove(&m.chunk);
            self.stale.remove(&m.key());
        }
    }

    /// Every mapped chunk.
    pub fn mapped(&self) -> impl Iterator<Item = &ChunkMap> {
        self.mapped.values()
    }

    /// The chunk mapped at the block holding `va`.
    pub fn lookup(&self, va: u64) -> Option<&ChunkMap> {
        let r = self.region_of(va)?;
        self.mapped.get(&(r.app.start, align_down(va, CHUNK)))
    }

    /// Splits `[start, start + len)` into the blocks it covers, checking it is made of whole
    /// blocks of one region (the first may start at the region's start, the last end at its
    /// end). Returns the region and the blocks' 2 MiB windows.
    fn blocks(&self, start: u64, len: u64) -> Result<(&RegionVa, Vec<u64>), DeviceError> {
        let end = start.checked_add(len).filter(|_| len > 0).ok_or_else(|| bad(start, len))?;
        let r = self.region_of(start).ok_or_else(|| bad(start, len))?;
        let start_ok = start.is_multiple_of(CHUNK) || start == r.app.start;
        if !start_ok || end > r.end() || (end % CHUNK != 0 && end != r.end()) {
            return Err(bad(start, len));
        }
        Ok((r, (align_down(start, CHUNK)..end).step_by(CHUNK as usize).collect()))
    }

    /// Plans `DeviceMmu::map`: validates the whole batch first (a refused batch changes
    /// nothing). `chunks` is the size of the physical index space in chunks.
    pub fn plan_map(&self, entries: &[MapEntry], chunks: u64) -> Result<MapPlan, DeviceError> {
        let mut plan = MapPlan::default();
        let mut seen = std::collections::HashSet::new();
        // One chunk at two blocks (aliasing) is never asked for; refused, since a parked mapping
        // of that chunk would be revived for one block and dropped for the other.
        let mut seen_chunks = std::collections::HashSet::new();
        for e in entries {
            let MapTarget::Device(pa) = e.target else {
                return Err(DeviceError::Other(format!(
                    "cuda: host memory cannot be mapped at {:#x} (remote host access is not supported; \
                     the data must migrate to the device)",
                    e.va
                )));
            };
            let access = Access::from_prot(e.prot).ok_or_else(|| bad(e.va, e.len))?;
            let (r, blocks) = self.blocks(e.va, e.len)?;
            // Each page at its window offset in the chunk, which is mapped whole at the window.
            if pa.0 % CHUNK != e.va % CHUNK {
                return Err(DeviceError::BadPhysical { addr: pa.0, len: e.len });
            }
            let first = pa.0 / CHUNK;
            if first.checked_add(blocks.len() as u64).is_none_or(|last| last > chunks) {
                return Err(DeviceError::BadPhysical { addr: pa.0, len: e.len });
            }
            for (k, &host_va) in blocks.iter().enumerate() {
                let chunk = first + k as u64;
                if !seen.insert((r.app.start, host_va)) {
                    return Err(bad(host_va.max(r.app.start), CHUNK));
                }
                if !seen_chunks.insert(chunk) {
                    return Err(DeviceError::BadPhysical { addr: chunk * CHUNK, len: CHUNK });
                }
                let m = ChunkMap { region: r.app.start, host_va, dev_va: r.dev_va_of(host_va), chunk, access };
                let mut set_access = true;
                match (self.mapped.get(&m.key()), self.parked.get(&m.key())) {
                    // Already there: only the access may change.
                    (Some(old), _) if old.chunk == chunk => {}
                    (Some(_), _) => return Err(bad(host_va.max(r.app.start), CHUNK)),
                    // Parked there with this access: back into use, no driver call. (With
                    // another access it is mapped afresh: on an H100, changing the access of a
                    // live mapping cost more than unmapping it and mapping it again.)
                    (None, Some(p))
                        if p.chunk == chunk
                            && p.dev_va == m.dev_va
                            && p.access == access
                            && !self.stale.contains(&m.key()) =>
                    {
                        set_access = false;
                        plan.revive.push(m);
                    }
                    (None, parked_here) => {
                        // The same parked mapping can be in the way twice in one batch (its
                        // block gets another chunk, its chunk goes to another block): once.
                        let elsewhere = self.parked_chunk.get(&chunk).and_then(|k| self.parked.get(k));
                        for p in parked_here.into_iter().chain(elsewhere) {
                            if !plan.drop.iter().any(|d| d.key() == p.key()) {
                                plan.drop.push(*p);
                            }
                        }
                        plan.maps.push(m);
                    }
                }
                if set_access {
                    push_run(&mut plan.access, AccessRun { region: m.region, dev_va: m.dev_va, len: CHUNK, access });
                }
            }
        }
        Ok(plan)
    }

    /// Records a carried-out map plan.
    pub fn commit_map(&mut self, plan: &MapPlan) {
        for m in &plan.drop {
            self.unpark(m);
        }
        for m in plan.revive.iter().chain(&plan.maps) {
            self.unpark(m);
            self.mapped.insert(m.key(), *m);
        }
        for run in &plan.access {
            // A run of a region that went (or came back with another reservation) since the plan
            // names no mapping any more: skipped, never a panic.
            let Some(r) = self.regions.get(&run.region).copied() else { continue };
            for dev_va in (run.dev_va..run.dev_va.saturating_add(run.len)).step_by(CHUNK as usize) {
                let Some(off) = dev_va.checked_sub(r.dev_base) else { continue };
                let Some(host_va) = r.window().checked_add(off) else { continue };
                if let Some(m) = self.mapped.get_mut(&(run.region, host_va)).filter(|m| m.dev_va == dev_va) {
                    m.access = run.access;
                }
            }
        }
    }

    /// Plans `DeviceMmu::unmap`: the mapped chunks inside the ranges (absent ones are skipped).
    pub fn plan_unmap(&self, ranges: &[VaRange]) -> Result<Vec<ChunkMap>, DeviceError> {
        let mut out = Vec::new();
        for r in ranges {
            let (region, blocks) = self.blocks(r.start, r.len)?;
            out.extend(blocks.iter().filter_map(|b| self.mapped.get(&(region.app.start, *b))).copied());
        }
        out.sort_by_key(ChunkMap::key);
        out.dedup();
        Ok(out)
    }

    /// Records carried-out unmaps.
    pub fn commit_unmap(&mut self, done: &[ChunkMap]) {
        for m in done {
            self.mapped.remove(&m.key());
        }
    }

    /// Plans `DeviceMmu::protect`: access runs over the mapped chunks (absent ones skipped). A
    /// protection granting nothing is refused (the core unmaps instead).
    pub fn plan_protect(&self, ranges: &[(VaRange, Prot)]) -> Result<Vec<AccessRun>, DeviceError> {
        let mut out = Vec::new();
        for (r, p) in ranges {
            let access = Access::from_prot(*p).ok_or(DeviceError::BadRange(*r))?;
            let (region, blocks) = self.blocks(r.start, r.len)?;
            for m in blocks.iter().filter_map(|b| self.mapped.get(&(region.app.start, *b))) {
                push_run(&mut out, AccessRun { region: m.region, dev_va: m.dev_va, len: CHUNK, access });
            }
        }
        Ok(out)
    }
}

/// Appends a one-chunk run, merging it into the previous run when contiguous in the same
/// reservation with the same access.
fn push_run(runs: &mut Vec<AccessRun>, run: AccessRun) {
    match runs.last_mut() {
        Some(l) if l.region == run.region && l.access == run.access && l.dev_va + l.len == run.dev_va => {
            l.len += run.len
        }
        _ => runs.push(run),
    }
}

/// The physical index space hetmm's allocator sees: `chunks` chunks of 2 MiB, chunk `k` being
/// `[k * CHUNK, (k + 1) * CHUNK)`. Each is a `cuMemCreate` allocation, created on first use
/// and mapped once into the device's physical window (where copies address it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysLayout {
    /// Number of chunks.
    pub chunks: u64,
}

impl PhysLayout {
    /// Bytes of the index space.
    pub fn bytes(&self) -> u64 {
        self.chunks * CHUNK
    }

    /// Chunk indices `[first, last)` that `[pa, pa + len)` touches, after checking it lies
    /// inside the index space.
    pub fn chunks_of(&self, pa: u64, len: u64) -> Result<std::ops::Range<u64>, DeviceError> {
        let end = pa.checked_add(len).filter(|&e| e <= self.bytes() && len > 0);
        let end = end.ok_or(DeviceError::BadPhysical { addr: pa, len })?;
        Ok(pa / CHUNK..end.div_ceil(CHUNK))
    }

    /// Chunks a batch of copy operations touches (sorted, deduplicated), after checking every
    /// physical range. Empty ops are ignored.
    pub fn chunks_for_copies(&self, ops: &[CopyOp]) -> Result<Vec<u64>, DeviceError> {
        let mut out = Vec::new();
        for op in ops.iter().filter(|o| !o.is_empty()) {
            let len = op.len();
            match *op {
                CopyOp::HostToDevice { src, dst, .. } => {
                    if src.0 == 0 {
                        return Err(DeviceError::Other("cuda: copy from a null host address".into()));
                    }
                    out.extend(self.chunks_of(dst.0, len)?);
                }
                CopyOp::DeviceToHost { src, dst, .. } => {
                    if dst.0 == 0 {
                        return Err(DeviceError::Other("cuda: copy to a null host address".into()));
                    }
                    out.extend(self.chunks_of(src.0, len)?);
                }
                CopyOp::DeviceToDevice { src, dst, .. } => {
                    out.extend(self.chunks_of(src.0, len)?);
                    out.extend(self.chunks_of(dst.0, len)?);
                }
                // The device offers no peer window (`DeviceCaps::peer` is `None`), so the core
                // never asks for one.
                CopyOp::PeerToDevice { src, .. } => {
                    return Err(DeviceError::Other(format!("cuda: no peer copies (from {:#x})", src.0)));
                }
                CopyOp::Zero { dst, .. } => out.extend(self.chunks_of(dst.0, len)?),
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

/// How much device memory hetmm takes: `cap` if given (it must fit in what is free), else what
/// is free less `headroom` (for the driver, kernels' stacks, other allocations), rounded down
/// to whole chunks. Refuses less than one chunk.
pub fn memory_budget(free: u64, cap: Option<u64>, headroom: u64) -> Result<u64, String> {
    let want = match cap {
        Some(c) if c > free => {
            return Err(format!("--device-mem {} MiB is more than the {} MiB free on the GPU", c >> 20, free >> 20))
        }
        Some(c) => c,
        None => free.saturating_sub(headroom),
    };
    let bytes = want / CHUNK * CHUNK;
    if bytes == 0 {
        return Err(format!("less than one 2 MiB chunk of GPU memory is available ({} MiB free)", free >> 20));
    }
    Ok(bytes)
}

/// Host ranges registered (pinned) for DMA, one per piece of each region
/// ([`crate::CudaConfig::pin_piece`] bytes, so that a piece whose host pages are discarded can be
/// registered again alone): a copy whose host side lies inside one runs from pinned pages; any
/// other is still correct but staged by the driver.
#[derive(Debug, Default)]
pub struct HostRanges {
    ranges: BTreeMap<u64, (u64, u64)>,
}

impl HostRanges {
    /// Records `[addr, addr + len)` as registered for the region starting at `region`.
    pub fn insert(&mut self, region: u64, addr: u64, len: u64) {
        self.ranges.insert(addr, (len, region));
    }

    /// Forgets the registration starting at `addr`.
    pub fn remove(&mut self, addr: u64) {
        self.ranges.remove(&addr);
    }

    /// Forgets every registration of the region starting at `region`; returns how many.
    pub fn remove_region(&mut self, region: u64) -> usize {
        let before = self.ranges.len();
        self.ranges.retain(|_, (_, r)| *r != region);
        before - self.ranges.len()
    }

    /// The end of the registered range holding `addr`, if one does.
    fn end_of(&self, addr: u64) -> Option<u64> {
        let (a, (l, _)) = self.ranges.range(..=addr).next_back()?;
        Some(a + l).filter(|&e| e > addr)
    }

    /// Cuts host-to-device and device-to-host copies where their host side leaves the
    /// registered range it starts in, so that each piece runs from one registration. A copy
    /// starting outside every registration stays whole (the driver stages it anyway). Other
    /// ops pass unchanged; empty ops are dropped.
    pub fn split(&self, ops: &[CopyOp]) -> Vec<CopyOp> {
        let mut out = Vec::with_capacity(ops.len());
        for op in ops.iter().filter(|o| !o.is_empty()) {
            let (host, dev, len, h2d) = match *op {
                CopyOp::HostToDevice { src, dst, len } => (src.0 as u64, dst.0, len, true),
                CopyOp::DeviceToHost { src, dst, len } => (dst.0 as u64, src.0, len, false),
                other => {
                    out.push(other);
                    continue;
                }
            };
            let mut done = 0;
            while done < len {
                let h = host + done;
                let piece = self.end_of(h).map_or(len - done, |e| (e - h).min(len - done));
                let (ha, pa) = (HostAddr(h as usize), PhysAddr(dev + done));
                out.push(if h2d {
                    CopyOp::HostToDevice { src: ha, dst: pa, len: piece }
                } else {
                    CopyOp::DeviceToHost { src: pa, dst: ha, len: piece }
                });
                done += piece;
            }
        }
        out
    }

    /// Whether `[addr, addr + len)` lies inside one registered range.
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else { return false };
        self.ranges.range(..=addr).next_back().is_some_and(|(a, (l, _))| end <= a + l)
    }
}

/// The host pieces of a region: `(offset, len)` of each registration, one per `piece` bytes of
/// the region (the last may be shorter).
pub fn host_pieces(len: u64, piece: u64) -> Vec<(u64, u64)> {
    let piece = piece.max(PAGE_SIZE);
    (0..len.div_ceil(piece)).map(|k| (k * piece, piece.min(len - k * piece))).collect()
}

/// `HETMM_CUDA_PIN`'s value, a size as `--size` takes it (`64M`, `1G`, bytes); `None` unless
/// it is a positive multiple of 2 MiB.
pub fn parse_pin_piece(s: &str) -> Option<u64> {
    parse_size(s).filter(|&n| n > 0 && n % CHUNK == 0)
}

/// The pieces `[first, last]` of a region (registrations of `piece` bytes from its start) that
/// `[off, off + len)` (offsets in the region, `len > 0`) touches.
pub fn pieces_touched(off: u64, len: u64, piece: u64) -> std::ops::RangeInclusive<u64> {
    let piece = piece.max(PAGE_SIZE);
    off / piece..=(off + len.max(1) - 1) / piece
}

/// Of the `unpinned` pieces (region start, piece index), those a host range of `hosts`
/// (address, length) overlaps: `base_of` gives a region's host backing address, pieces are
/// `piece` bytes from it (the last may be shorter; overlapping its tail does no harm).
pub fn pieces_used(
    unpinned: impl IntoIterator<Item = (u64, u64)>,
    base_of: impl Fn(u64) -> Option<u64>,
    piece: u64,
    hosts: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    unpinned
        .into_iter()
        .filter(|&(start, k)| {
            let Some(base) = base_of(start) else { return false };
            let lo = base + k * piece;
            hosts.iter().any(|&(a, len)| len > 0 && a < lo + piece && lo < a + len)
        })
        .collect()
}

/// Merges each host-to-device (or device-to-host) copy into the one before it when both its
/// host and its device side continue that one's: the core emits a copy per block or run of
/// pages, and the copy engines run long copies faster. Other ops pass unchanged and in order;
/// empty ops are dropped.
pub fn coalesce_copies(ops: &[CopyOp]) -> Vec<CopyOp> {
    let follows = |a: u64, len: u64, b: u64| a.checked_add(len) == Some(b);
    let mut out: Vec<CopyOp> = Vec::with_capacity(ops.len());
    for op in ops.iter().filter(|o| !o.is_empty()) {
        let merged = match (out.last_mut(), *op) {
            (Some(CopyOp::HostToDevice { src, dst, len }), CopyOp::HostToDevice { src: s2, dst: d2, len: l2 })
                if follows(src.0 as u64, *len, s2.0 as u64) && follows(dst.0, *len, d2.0) =>
            {
                *len += l2;
                true
            }
            (Some(CopyOp::DeviceToHost { src, dst, len }), CopyOp::DeviceToHost { src: s2, dst: d2, len: l2 })
                if follows(src.0, *len, s2.0) && follows(dst.0 as u64, *len, d2.0 as u64) =>
            {
                *len += l2;
                true
            }
            _ => false,
        };
        if !merged {
            out.push(*op);
        }
    }
    out
}

/// Splits `maps` (sorted by region and address, as [`PageTable::plan_unmap`] returns them) into runs of
/// chunks of one region mapped at consecutive device addresses.
pub fn contiguous_runs(maps: &[ChunkMap]) -> Vec<&[ChunkMap]> {
    let mut out = Vec::new();
    let mut start = 0;
    for k in 1..=maps.len() {
        let breaks =
            k == maps.len() || maps[k].region != maps[k - 1].region || maps[k].dev_va != maps[k - 1].dev_va + CHUNK;
        if breaks {
            out.push(&maps[start..k]);
            start = k;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 0x7f00_0000_0000;
    const D: u64 = 0x2_0000_0000;

    fn table() -> PageTable {
        let mut pt = PageTable::new();
        // Region 1: 3 blocks and 5 pages, shifted to D. Region 2: same address.
        pt.add_region(RegionVa { app: VaRange::new(A, 3 * CHUNK + 5 * PAGE_SIZE), dev_base: D }).unwrap();
        pt.add_region(RegionVa { app: VaRange::new(A + 16 * CHUNK, CHUNK), dev_base: A + 16 * CHUNK }).unwrap();
        pt
    }

    fn entry(va: u64, len: u64, pa: u64, prot: Prot) -> MapEntry {
        MapEntry { va, len, target: MapTarget::Device(PhysAddr(pa)), prot }
    }

    #[test]
    fn unmap_runs_follow_device_addresses_and_regions() {
        let m = |region, dev_va| ChunkMap { region, host_va: dev_va, dev_va, chunk: 0, access: Access::ReadWrite };
        let maps = [m(1, 0), m(1, CHUNK), m(1, 3 * CHUNK), m(2, 4 * CHUNK), m(2, 5 * CHUNK)];
        let runs: Vec<usize> = contiguous_runs(&maps).iter().map(|r| r.len()).collect();
        assert_eq!(runs, vec![2, 1, 2]);
        assert!(contiguous_runs(&[]).is_empty());
    }

    #[test]
    fn address_planning() {
        let pt = table();
        let len = |start, len| RegionVa::reservation_len(VaRange::new(start, len));
        assert_eq!(len(A, 5 * PAGE_SIZE), Some(CHUNK));
        assert_eq!(len(A, 3 * CHUNK + 5 * PAGE_SIZE), Some(4 * CHUNK));
        assert_eq!(len(A + PAGE_SIZE, 2 * CHUNK), Some(3 * CHUNK), "the windows it touches");
        assert_eq!(len(A + PAGE_SIZE, CHUNK - PAGE_SIZE), Some(CHUNK));
        assert_eq!(len(u64::MAX - PAGE_SIZE, 2 * PAGE_SIZE), None);
        // Shifted region: every pointer moves by the same offset.
        assert_eq!(pt.translate(A), Some(D));
        assert_eq!(pt.translate(A + 12345), Some(D + 12345));
        assert_eq!(pt.translate(A + 3 * CHUNK + 5 * PAGE_SIZE - 1), Some(D + 3 * CHUNK + 5 * PAGE_SIZE - 1));
        assert_eq!(pt.translate(A + 3 * CHUNK + 5 * PAGE_SIZE), None);
        assert!(!pt.region(A).unwrap().same_address());
        // Same-address region: pointers unchanged.
        assert_eq!(pt.translate(A + 16 * CHUNK + 8), Some(A + 16 * CHUNK + 8));
        assert!(pt.region(A + 16 * CHUNK).unwrap().same_address());
        assert_eq!(pt.translate(A - 1), None);
        // Overlap and misalignment are refused; a start inside a window is not.
        let mut pt = table();
        assert!(pt.add_region(RegionVa { app: VaRange::new(A + CHUNK, CHUNK), dev_base: 0 }).is_err());
        assert!(pt.add_region(RegionVa { app: VaRange::new(A + 20 * CHUNK + 100, CHUNK), dev_base: 0 }).is_err());
        assert!(pt.add_region(RegionVa { app: VaRange::new(A + 20 * CHUNK, CHUNK), dev_base: 4096 }).is_err());
        let inside = RegionVa { app: VaRange::new(A + 20 * CHUNK + 4096, CHUNK), dev_base: D + 8 * CHUNK };
        pt.add_region(inside).unwrap();
        assert_eq!(pt.translate(A + 20 * CHUNK + 4096), Some(D + 8 * CHUNK + 4096), "the offset in the window kept");
        assert!(!inside.same_address());
        assert!(RegionVa { app: inside.app, dev_base: A + 20 * CHUNK }.same_address());
    }

    #[test]
    fn parked_chunks_come_back_free_and_give_way() {
        let mut pt = table();
        let rw = Prot::READ | Prot::WRITE;
        let plan = pt.plan_map(&[entry(A, 2 * CHUNK, 4 * CHUNK, rw)], 16).unwrap();
        pt.commit_map(&plan);
        let both = pt.plan_unmap(&[VaRange::new(A, 2 * CHUNK)]).unwrap();
        pt.park(&both);
        assert!(pt.lookup(A).is_none() && pt.lookup(A + CHUNK).is_none(), "parked is unmapped for launches");
        assert_eq!(pt.parked().count(), 2);
        // The same chunk at the same block with the same access: back without a call. With
        // another access: unmapped and mapped afresh.
        let plan =
            pt.plan_map(&[entry(A, CHUNK, 4 * CHUNK, rw), entry(A + CHUNK, CHUNK, 5 * CHUNK, Prot::READ)], 16).unwrap();
        assert_eq!(plan.revive.iter().map(|m| m.chunk).collect::<Vec<_>>(), vec![4]);
        assert_eq!(plan.drop.iter().map(|m| m.chunk).collect::<Vec<_>>(), vec![5]);
        assert_eq!(plan.maps.iter().map(|m| m.chunk).collect::<Vec<_>>(), vec![5]);
        assert_eq!(plan.access, vec![AccessRun { region: A, dev_va: D + CHUNK, len: CHUNK, access: Access::Read }]);
        pt.commit_map(&plan);
        assert_eq!(pt.lookup(A + CHUNK).map(|m| (m.chunk, m.access)), Some((5, Access::Read)));
        assert_eq!(pt.parked().count(), 0);
        // Parked chunk 4 wanted at another block, and another chunk wanted at parked block A+CHUNK:
        // both parked mappings are dropped first.
        let both = pt.plan_unmap(&[VaRange::new(A, 2 * CHUNK)]).unwrap();
        pt.park(&both);
        let plan = pt
            .plan_map(&[entry(A + 2 * CHUNK, CHUNK, 4 * CHUNK, rw), entry(A + CHUNK, CHUNK, 7 * CHUNK, rw)], 16)
            .unwrap();
        let mut dropped: Vec<(u64, u64)> = plan.drop.iter().map(|m| (m.host_va, m.chunk)).collect();
        dropped.sort_unstable();
        assert_eq!(dropped, vec![(A, 4), (A + CHUNK, 5)]);
        assert_eq!(plan.maps.len(), 2);
        pt.commit_map(&plan);
        assert_eq!(pt.parked().count(), 0);
        // One parked mapping in the way of two entries of a batch is dropped once: block
        // A+2*CHUNK's parked chunk 4 goes to block A, and block A+2*CHUNK gets chunk 6.
        pt.park(&pt.plan_unmap(&[VaRange::new(A + CHUNK, 2 * CHUNK)]).unwrap());
        let plan =
            pt.plan_map(&[entry(A, CHUNK, 4 * CHUNK, rw), entry(A + 2 * CHUNK, CHUNK, 6 * CHUNK, rw)], 16).unwrap();
        assert_eq!(plan.drop.iter().map(|m| (m.host_va, m.chunk)).collect::<Vec<_>>(), vec![(A + 2 * CHUNK, 4)]);
        pt.commit_map(&plan);
        assert_eq!(pt.parked().map(|m| m.chunk).collect::<Vec<_>>(), vec![7], "block A+CHUNK's chunk stays parked");
        // A removed region takes its parked chunks with it.
        let all = pt.plan_unmap(&[VaRange::new(A + CHUNK, 2 * CHUNK)]).unwrap();
        pt.park(&all);
        assert_eq!(pt.parked_in(A).len(), 2);
        pt.remove_region(A);
        assert_eq!(pt.parked().count(), 0);
    }

    /// A mapping a failed batch could not undo is in the way of the next map of its block or
    /// chunk, and never comes back as it is (its access may never have been set).
    #[test]
    fn a_mapping_left_by_a_failed_undo_is_dropped_never_revived() {
        let mut pt = table();
        let rw = Prot::READ | Prot::WRITE;
        let plan = pt.plan_map(&[entry(A, CHUNK, 4 * CHUNK, rw)], 16).unwrap();
        // The batch failed and undoing chunk 4's map failed too: nothing was committed.
        pt.park_stale(&plan.maps[0]);
        assert!(pt.lookup(A).is_none(), "launches never see it");
        let again = pt.plan_map(&[entry(A, CHUNK, 4 * CHUNK, rw)], 16).unwrap();
        assert!(again.revive.is_empty(), "not revived: {again:?}");
        assert_eq!(again.drop.iter().map(|m| m.chunk).collect::<Vec<_>>(), vec![4]);
        assert_eq!(again.maps.iter().map(|m| m.chunk).collect::<Vec<_>>(), vec![4]);
        pt.unpark(&again.drop[0]);
        pt.commit_map(&again);
        assert_eq!(pt.parked().count(), 0);
        // Its chunk wanted at another block: dropped first there too.
        let plan = pt.plan_map(&[entry(A + CHUNK, CHUNK, 6 * CHUNK, rw)], 16).unwrap();
        pt.park_stale(&plan.maps[0]);
        let other = pt.plan_map(&[entry(A + 2 * CHUNK, CHUNK, 6 * CHUNK, rw)], 16).unwrap();
        assert_eq!(other.drop.iter().map(|m| (m.host_va, m.chunk)).collect::<Vec<_>>(), vec![(A + CHUNK, 6)]);
    }

    #[test]
    fn map_batches_chunks_and_merges_access() {
        let mut pt = table();
        let rw = Prot::READ | Prot::WRITE;
        // Two blocks in one entry (chunks 4, 5), one more block (chunk 9), the partial tail
        // (chunk 2) read-only.
        let entries = [
            entry(A, 2 * CHUNK, 4 * CHUNK, rw),
            entry(A + 2 * CHUNK, CHUNK, 9 * CHUNK, rw),
            entry(A + 3 * CHUNK, 5 * PAGE_SIZE, 2 * CHUNK, Prot::READ),
        ];
        let plan = pt.plan_map(&entries, 16).unwrap();
        let chunks: Vec<(u64, u64)> = plan.maps.iter().map(|m| (m.dev_va, m.chunk)).collect();
        assert_eq!(chunks, vec![(D, 4), (D + CHUNK, 5), (D + 2 * CHUNK, 9), (D + 3 * CHUNK, 2)]);
        // Access: one run for the three writable chunks, one for the read-only tail.
        assert_eq!(
            plan.access,
            vec![
                AccessRun { region: A, dev_va: D, len: 3 * CHUNK, access: Access::ReadWrite },
                AccessRun { region: A, dev_va: D + 3 * CHUNK, len: CHUNK, access: Access::Read },
            ]
        );
        pt.commit_map(&plan);
        assert_eq!(pt.lookup(A + CHUNK + 77).map(|m| m.chunk), Some(5));
        // Mapping the same chunk again only changes access; another chunk is refused.
        let again = pt.plan_map(&[entry(A, CHUNK, 4 * CHUNK, Prot::READ)], 16).unwrap();
        assert!(again.maps.is_empty());
        pt.commit_map(&again);
        assert_eq!(pt.lookup(A).unwrap().access, Access::Read);
        assert!(pt.plan_map(&[entry(A, CHUNK, 7 * CHUNK, rw)], 16).is_err());
    }

    /// Regions starting inside 2 MiB windows, the second in the window where the first ends:
    /// each block's chunk is mapped whole at its window in its region's reservation, and the two
    /// mappings of the shared window are told apart by region everywhere.
    #[test]
    fn regions_starting_inside_a_window_share_it_apart() {
        let w = A + 32 * CHUNK;
        let (p, rw) = (PAGE_SIZE, Prot::READ | Prot::WRITE);
        let x = RegionVa { app: VaRange::new(w + 16 * p, CHUNK - 8 * p), dev_base: w };
        let y = RegionVa { app: VaRange::new(x.app.end(), 2 * CHUNK - 8 * p), dev_base: D };
        let mut pt = PageTable::new();
        pt.add_region(x).unwrap();
        pt.add_region(y).unwrap();
        assert_eq!((pt.translate(w + 16 * p), pt.translate(y.app.start)), (Some(w + 16 * p), Some(D + 8 * p)));
        // x: a partial first block (chunk 3, its pages from page 16) and a partial last one
        // (chunk 5); y: its first two blocks in one entry (chunks 6, 7).
        let entries = [
            entry(x.app.start, CHUNK - 16 * p, 3 * CHUNK + 16 * p, rw),
            entry(w + CHUNK, 8 * p, 5 * CHUNK, rw),
            entry(y.app.start, 2 * CHUNK - 8 * p, 6 * CHUNK + 8 * p, Prot::READ),
        ];
        let plan = pt.plan_map(&entries, 16).unwrap();
        let maps: Vec<_> = plan.maps.iter().map(|m| (m.region, m.host_va, m.dev_va, m.chunk)).collect();
        assert_eq!(
            maps,
            vec![
                (x.app.start, w, w, 3),
                (x.app.start, w + CHUNK, w + CHUNK, 5),
                (y.app.start, w + CHUNK, D, 6),
                (y.app.start, w + 2 * CHUNK, D + CHUNK, 7),
            ]
        );
        pt.commit_map(&plan);
        assert_eq!(pt.lookup(w + CHUNK + 7 * p).map(|m| m.chunk), Some(5), "x's part of the shared window");
        assert_eq!(pt.lookup(w + CHUNK + 8 * p).map(|m| (m.chunk, m.access)), Some((6, Access::Read)));
        assert_eq!(pt.lookup(w + 15 * p), None, "before x: no region");
        // A first block's pages must sit at their window offsets, and it starts at the region.
        for bad in [
            entry(x.app.start, CHUNK - 16 * p, 3 * CHUNK, rw),
            entry(w + 17 * p, CHUNK - 17 * p, 3 * CHUNK + 17 * p, rw),
        ] {
            assert!(pt.plan_map(&[bad], 16).is_err(), "{bad:?}");
        }
        // Unmapping and protecting y leaves x's chunk in the shared window alone.
        let un = pt.plan_unmap(&[y.app]).unwrap();
        assert_eq!(un.iter().map(|m| m.chunk).collect::<Vec<_>>(), vec![6, 7]);
        let runs = pt.plan_protect(&[(y.app, rw)]).unwrap();
        assert_eq!(runs, vec![AccessRun { region: y.app.start, dev_va: D, len: 2 * CHUNK, access: Access::ReadWrite }]);
        pt.commit_map(&MapPlan { access: runs, ..MapPlan::default() });
        assert_eq!(pt.lookup(y.app.start).map(|m| m.access), Some(Access::ReadWrite));
        assert_eq!(pt.lookup(w + CHUNK).map(|m| m.access), Some(Access::ReadWrite));
        // Parked in the shared window, each comes back to its own region.
        pt.park(&un);
        pt.park(&pt.plan_unmap(&[VaRange::new(w + CHUNK, 8 * p)]).unwrap());
        assert_eq!(pt.parked().count(), 3);
        let again = pt.plan_map(&[entry(w + CHUNK, 8 * p, 5 * CHUNK, rw)], 16).unwrap();
        assert_eq!(again.revive.iter().map(|m| (m.region, m.chunk)).collect::<Vec<_>>(), vec![(x.app.start, 5)]);
        assert!(again.drop.is_empty() && again.maps.is_empty(), "{again:?}");
        pt.commit_map(&again);
        pt.remove_region(y.app.start);
        assert_eq!(pt.parked().count(), 0);
        assert_eq!(pt.lookup(w + CHUNK).map(|m| m.chunk), Some(5));
    }

    #[test]
    fn map_refuses_bad_batches_whole() {
        let pt = table();
        let rw = Prot::READ | Prot::WRITE;
        let good = entry(A, CHUNK, 0, rw);
        for bad in [
            entry(A + PAGE_SIZE, CHUNK, 0, rw),         // not on a block boundary
            entry(A, CHUNK / 2, 0, rw),                 // half a chunk, not at the region's end
            entry(A + 3 * CHUNK, 6 * PAGE_SIZE, 0, rw), // past the region's end
            entry(A, CHUNK, PAGE_SIZE, rw),             // physical address not chunk aligned
            entry(A, CHUNK, 16 * CHUNK, rw),            // beyond physical memory
            entry(A, CHUNK, 0, Prot::empty()),          // no access
            entry(A + 40 * CHUNK, CHUNK, 0, rw),        // no region
            MapEntry { target: MapTarget::Host(HostAddr(0x1000)), ..good }, // remote host memory
        ] {
            assert!(pt.plan_map(&[good, bad], 16).is_err(), "{bad:?}");
        }
        // The same block twice in one batch.
        assert!(pt.plan_map(&[good, entry(A, CHUNK, CHUNK, rw)], 16).is_err());
    }

    #[test]
    fn unmap_and_protect_whole_chunks() {
        let mut pt = table();
        let rw = Prot::READ | Prot::WRITE;
        let plan =
            pt.plan_map(&[entry(A, 2 * CHUNK, 0, rw), entry(A + 3 * CHUNK, 5 * PAGE_SIZE, 5 * CHUNK, rw)], 8).unwrap();
        pt.commit_map(&plan);
        // Absent chunks (block 2) are skipped; the partial tail unmaps by its region end.
        let un = pt.plan_unmap(&[VaRange::new(A + CHUNK, 2 * CHUNK + 5 * PAGE_SIZE)]).unwrap();
        assert_eq!(un.iter().map(|m| m.chunk).collect::<Vec<_>>(), vec![1, 5]);
        assert!(pt.plan_unmap(&[VaRange::new(A, PAGE_SIZE)]).is_err(), "part of a chunk");
        let pr = pt.plan_protect(&[(VaRange::new(A, 4 * CHUNK), Prot::READ)]);
        assert!(pr.is_err(), "past the region's end");
        let pr = pt.plan_protect(&[(VaRange::new(A, 3 * CHUNK + 5 * PAGE_SIZE), Prot::READ)]).unwrap();
        assert_eq!(
            pr,
            vec![
                AccessRun { region: A, dev_va: D, len: 2 * CHUNK, access: Access::Read },
                AccessRun { region: A, dev_va: D + 3 * CHUNK, len: CHUNK, access: Access::Read },
            ]
        );
        pt.commit_unmap(&un);
        assert!(pt.lookup(A + CHUNK).is_none());
        assert!(pt.lookup(A).is_some());
        assert_eq!(pt.mapped_in(A).len(), 1);
        pt.remove_region(A);
        assert_eq!(pt.mapped().count(), 0);
        assert_eq!(pt.translate(A), None);
    }

    #[test]
    fn physical_index_bookkeeping() {
        let l = PhysLayout { chunks: 4 };
        assert_eq!(l.bytes(), 4 * CHUNK);
        assert_eq!(l.chunks_of(0, CHUNK).unwrap(), 0..1);
        assert_eq!(l.chunks_of(CHUNK - PAGE_SIZE, 2 * PAGE_SIZE).unwrap(), 0..2);
        assert_eq!(l.chunks_of(3 * CHUNK, CHUNK).unwrap(), 3..4);
        assert!(l.chunks_of(3 * CHUNK, CHUNK + 1).is_err());
        assert!(l.chunks_of(u64::MAX, 2).is_err());
        assert!(l.chunks_of(0, 0).is_err());
        let ops = [
            CopyOp::HostToDevice { src: HostAddr(0x1000), dst: PhysAddr(3 * CHUNK), len: PAGE_SIZE },
            CopyOp::Zero { dst: PhysAddr(0), len: CHUNK + PAGE_SIZE },
            CopyOp::DeviceToHost { src: PhysAddr(CHUNK), dst: HostAddr(0x2000), len: 0 },
        ];
        assert_eq!(l.chunks_for_copies(&ops).unwrap(), vec![0, 1, 3]);
        let null = [CopyOp::DeviceToHost { src: PhysAddr(0), dst: HostAddr(0), len: PAGE_SIZE }];
        assert!(l.chunks_for_copies(&null).is_err());
        let beyond = [CopyOp::DeviceToDevice { src: PhysAddr(0), dst: PhysAddr(4 * CHUNK), len: 1 }];
        assert!(l.chunks_for_copies(&beyond).is_err());
    }

    #[test]
    fn budget() {
        let g = 1u64 << 30;
        assert_eq!(memory_budget(10 * g, None, g).unwrap(), 9 * g);
        assert_eq!(memory_budget(10 * g, Some(g + 3), g).unwrap(), g);
        assert!(memory_budget(10 * g, Some(11 * g), g).unwrap_err().contains("more than"));
        assert!(memory_budget(g / 2, None, g).is_err());
        assert_eq!(memory_budget(9 * CHUNK + 5, None, 0).unwrap(), 9 * CHUNK);
    }

    #[test]
    fn host_registrations() {
        let mut h = HostRanges::default();
        h.insert(A, 0x5000_0000, 4 * PAGE_SIZE);
        h.insert(A + CHUNK, 0x6000_0000, PAGE_SIZE);
        assert!(h.covers(0x5000_0000, 4 * PAGE_SIZE));
        assert!(h.covers(0x5000_1000, PAGE_SIZE));
        assert!(!h.covers(0x5000_1000, 4 * PAGE_SIZE));
        assert!(!h.covers(0x4fff_f000, 2 * PAGE_SIZE));
        assert!(!h.covers(u64::MAX, 2));
        assert_eq!(h.remove_region(A), 1);
        assert!(!h.covers(0x5000_0000, 1));
        assert!(h.covers(0x6000_0000, 1));
        assert_eq!(h.remove_region(A), 0);
        h.remove(0x6000_0000);
        assert!(!h.covers(0x6000_0000, 1));
    }

    #[test]
    fn copies_pin_again_only_the_unpinned_pieces_they_use() {
        let piece = 64 << 20;
        let base = |start: u64| (start == 1 << 40).then_some(0x7000_0000_0000u64);
        let unpinned = [(1 << 40, 0), (1 << 40, 2), (1 << 41, 0)];
        let b = 0x7000_0000_0000u64;
        // The end of piece 0, the start of piece 2; nothing of the region not known.
        let hosts = [(b + piece - 4096, 4096), (b + 2 * piece, 8192)];
        assert_eq!(pieces_used(unpinned, base, piece, &hosts), vec![(1 << 40, 0), (1 << 40, 2)]);
        // Piece 1 alone, touching neither neighbour; an empty range touches nothing.
        let hosts = [(b + piece, piece), (b, 0)];
        assert_eq!(pieces_used(unpinned, base, piece, &hosts), vec![]);
    }

    #[test]
    fn pin_pieces_parse_as_multiples_of_2_mib() {
        assert_eq!(parse_pin_piece("2M"), Some(CHUNK));
        assert_eq!(parse_pin_piece(" 64m "), Some(64 << 20));
        assert_eq!(parse_pin_piece("1G"), Some(1 << 30));
        assert_eq!(parse_pin_piece("4194304"), Some(4 << 20));
        assert_eq!(parse_pin_piece("2048K"), Some(CHUNK));
        assert_eq!(parse_pin_piece("2MiB"), Some(CHUNK));
        for bad in ["", "0", "3M", "1K", "M", "-2M", "99999999999999999999G", "18014398509481984G"] {
            assert_eq!(parse_pin_piece(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn host_pieces_cover_a_region_from_its_start() {
        assert_eq!(
            host_pieces(2 * CHUNK + 3 * PAGE_SIZE, CHUNK),
            vec![(0, CHUNK), (CHUNK, CHUNK), (2 * CHUNK, 3 * PAGE_SIZE)]
        );
        assert_eq!(host_pieces(CHUNK, CHUNK), vec![(0, CHUNK)]);
        assert_eq!(host_pieces(5 * CHUNK, 4 * CHUNK), vec![(0, 4 * CHUNK), (4 * CHUNK, CHUNK)]);
        assert_eq!(pieces_touched(0, PAGE_SIZE, 4 * CHUNK), 0..=0);
        assert_eq!(pieces_touched(4 * CHUNK - PAGE_SIZE, 2 * PAGE_SIZE, 4 * CHUNK), 0..=1);
        assert_eq!(pieces_touched(3 * CHUNK, 6 * CHUNK, CHUNK), 3..=8);
    }

    fn h2d(src: u64, dst: u64, len: u64) -> CopyOp {
        CopyOp::HostToDevice { src: HostAddr(src as usize), dst: PhysAddr(dst), len }
    }

    fn d2h(src: u64, dst: u64, len: u64) -> CopyOp {
        CopyOp::DeviceToHost { src: PhysAddr(src), dst: HostAddr(dst as usize), len }
    }

    #[test]
    fn copies_that_continue_each_other_on_both_sides_are_merged() {
        let h = 0x7000_0000;
        let zero = CopyOp::Zero { dst: PhysAddr(9 * CHUNK), len: PAGE_SIZE };
        let ops = [
            h2d(h, 0, CHUNK),
            h2d(h + CHUNK, CHUNK, CHUNK),
            h2d(h + 2 * CHUNK, 0, 0),
            h2d(h + 2 * CHUNK, 2 * CHUNK, PAGE_SIZE),
            // The device side jumps: a new copy.
            h2d(h + 2 * CHUNK + PAGE_SIZE, 5 * CHUNK, PAGE_SIZE),
            // The host side jumps.
            h2d(h + 4 * CHUNK, 5 * CHUNK + PAGE_SIZE, PAGE_SIZE),
            zero,
            d2h(6 * CHUNK, h, CHUNK),
            d2h(7 * CHUNK, h + CHUNK, CHUNK),
            // Continues the device-to-host copy's addresses, but the other way.
            h2d(h + 2 * CHUNK, 8 * CHUNK, CHUNK),
        ];
        let out = coalesce_copies(&ops);
        assert_eq!(
            out,
            vec![
                h2d(h, 0, 2 * CHUNK + PAGE_SIZE),
                h2d(h + 2 * CHUNK + PAGE_SIZE, 5 * CHUNK, PAGE_SIZE),
                h2d(h + 4 * CHUNK, 5 * CHUNK + PAGE_SIZE, PAGE_SIZE),
                zero,
                d2h(6 * CHUNK, h, 2 * CHUNK),
                h2d(h + 2 * CHUNK, 8 * CHUNK, CHUNK),
            ]
        );
        assert_eq!(out.iter().map(CopyOp::len).sum::<u64>(), ops.iter().map(CopyOp::len).sum::<u64>());
        // Addresses at the top of the space do not wrap into a merge.
        let top = [d2h(u64::MAX - PAGE_SIZE + 1, 0, PAGE_SIZE), d2h(0, PAGE_SIZE, PAGE_SIZE)];
        assert_eq!(coalesce_copies(&top).len(), 2);
    }

    #[test]
    fn host_side_copies_split_where_a_registration_ends() {
        const R: u64 = 0x7000_0000;
        let mut reg = HostRanges::default();
        reg.insert(R, R, 4 * CHUNK);
        reg.insert(R, R + 4 * CHUNK, CHUNK);
        let ops = [
            h2d(R + 3 * CHUNK, 0, 2 * CHUNK + PAGE_SIZE),
            CopyOp::Zero { dst: PhysAddr(0), len: PAGE_SIZE },
            d2h(CHUNK, R, 0),
            d2h(CHUNK, R, 4 * CHUNK),
            // Outside every registration: whole.
            d2h(CHUNK, 0x1000_0000, 3 * CHUNK),
        ];
        let out = reg.split(&ops);
        assert_eq!(
            out,
            vec![
                h2d(R + 3 * CHUNK, 0, CHUNK),
                h2d(R + 4 * CHUNK, CHUNK, CHUNK),
                h2d(R + 5 * CHUNK, 2 * CHUNK, PAGE_SIZE),
                CopyOp::Zero { dst: PhysAddr(0), len: PAGE_SIZE },
                d2h(CHUNK, R, 4 * CHUNK),
                d2h(CHUNK, 0x1000_0000, 3 * CHUNK),
            ]
        );
        assert!(out.iter().all(|o| match *o {
            CopyOp::HostToDevice { src, len, .. } => reg.covers(src.0 as u64, len) || src.0 as u64 >= R + 5 * CHUNK,
            CopyOp::DeviceToHost { dst, len, .. } => reg.covers(dst.0 as u64, len) || (dst.0 as u64) < R,
            _ => true,
        }));
        assert_eq!(out.iter().map(CopyOp::len).sum::<u64>(), ops.iter().map(CopyOp::len).sum::<u64>());
    }

    /// `protect` (device.rs) plans its access runs, releases the page-table lock to apply them,
    /// then commits the plan under a new lock. A region removed (or the whole table torn down by
    /// `destroy_page_table`) in between leaves runs naming a region the table no longer has:
    /// committing them must not panic (it indexed `self.regions[&run.region]`).
    #[test]
    fn commit_of_runs_for_a_removed_region_does_not_panic() {
        let mut pt = table();
        let rw = Prot::READ | Prot::WRITE;
        pt.commit_map(&pt.plan_map(&[entry(A, CHUNK, 0, rw)], 16).unwrap());
        let runs = pt.plan_protect(&[(VaRange::new(A, CHUNK), Prot::READ)]).unwrap();
        pt.remove_region(A);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pt.commit_map(&MapPlan { access: runs.clone(), ..MapPlan::default() });
        }));
        assert!(r.is_ok(), "commit_map panicked on runs of a removed region");
        // The region comes back at the same host addresses but another device base (the driver
        // chose another reservation), with the block mapped afresh read-write: the stale runs
        // must neither underflow nor change the new mapping's recorded access.
        pt.add_region(RegionVa { app: VaRange::new(A, 3 * CHUNK + 5 * PAGE_SIZE), dev_base: D + 64 * CHUNK }).unwrap();
        pt.commit_map(&pt.plan_map(&[entry(A, CHUNK, 0, rw)], 16).unwrap());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pt.commit_map(&MapPlan { access: runs.clone(), ..MapPlan::default() });
        }));
        assert!(r.is_ok(), "commit_map panicked on runs of a replaced region");
        assert_eq!(pt.lookup(A).map(|m| m.access), Some(Access::ReadWrite), "stale run applied to a new mapping");
    }

    /// One physical chunk at two blocks of one batch: with that chunk parked at the first block,
    /// the plan both revives the parked mapping (no driver call, recorded as mapped) and drops it
    /// (`cuMemUnmap`) because the second block wants its chunk. Committed, the table says the
    /// block is mapped while the driver has unmapped it: a launch passes the residency check and
    /// the kernel faults on the GPU. Such a batch must be refused whole.
    #[test]
    fn one_chunk_at_two_blocks_of_a_batch_is_refused() {
        let mut pt = table();
        let rw = Prot::READ | Prot::WRITE;
        pt.commit_map(&pt.plan_map(&[entry(A, CHUNK, 4 * CHUNK, rw)], 16).unwrap());
        pt.park(&pt.plan_unmap(&[VaRange::new(A, CHUNK)]).unwrap());
        let batch = [entry(A, CHUNK, 4 * CHUNK, rw), entry(A + CHUNK, CHUNK, 4 * CHUNK, rw)];
        match pt.plan_map(&batch, 16) {
            Err(_) => {}
            Ok(plan) => {
                let revived_and_dropped = plan.revive.iter().any(|r| plan.drop.iter().any(|d| d.host_va == r.host_va));
                panic!("batch mapping chunk 4 twice accepted (revived and dropped at once: {revived_and_dropped}): {plan:?}");
            }
        }
        // Without anything parked too: two blocks aliasing one chunk is never a valid batch.
        let pt = table();
        assert!(pt
            .plan_map(&[entry(A, 2 * CHUNK, 4 * CHUNK, rw), entry(A + 2 * CHUNK, CHUNK, 5 * CHUNK, rw)], 16)
            .is_err());
    }

    /// The core's rescue after a failed copy home in an munmap (b746c88): a block whose pages stay
    /// together keeps its chunk, its mapping in the old region goes (parked: it was read-write),
    /// the old region is removed, and the new region (which may start inside the window, and get
    /// another reservation because a neighbour holds that window's host addresses) maps the same
    /// chunk again at the same window offset. Nothing of the old region may be revived or stay
    /// parked, and the chunk is mapped once, in the new region only.
    #[test]
    fn a_rescued_chunk_is_mapped_again_only_in_the_new_region() {
        let rw = Prot::READ | Prot::WRITE;
        let mut pt = PageTable::new();
        // Old region: four whole blocks at the host's addresses; chunk 9 at its third block.
        let old = RegionVa { app: VaRange::new(A, 4 * CHUNK), dev_base: A };
        pt.add_region(old).unwrap();
        pt.commit_map(&pt.plan_map(&[entry(A + 2 * CHUNK, CHUNK, 9 * CHUNK, rw)], 16).unwrap());
        // The munmap of [A + CHUNK / 2, A + 5 CHUNK / 2): block 2 keeps its upper half.
        pt.park(&pt.plan_unmap(&[VaRange::new(A + 2 * CHUNK, CHUNK)]).unwrap());
        assert_eq!(pt.parked_in(A).len(), 1);
        let gone = pt.parked_in(A);
        pt.remove_region(A);
        assert_eq!(pt.parked().count(), 0, "the old region's parked mapping went with it");
        assert!(gone.iter().all(|m| !pt.is_parked(m)));
        // The first part keeps the old start (a new reservation there); the second starts inside
        // block 2's window, shifted (another region took the window's host addresses).
        let half = CHUNK / 2;
        pt.add_region(RegionVa { app: VaRange::new(A, half), dev_base: A }).unwrap();
        let second = RegionVa { app: VaRange::new(A + 2 * CHUNK + half, CHUNK + half), dev_base: D };
        pt.add_region(second).unwrap();
        // The rescued pages keep their offsets in chunk 9: the block maps from its region's start.
        let plan = pt.plan_map(&[entry(A + 2 * CHUNK + half, half, 9 * CHUNK + half, rw)], 16).unwrap();
        assert!(plan.revive.is_empty() && plan.drop.is_empty(), "{plan:?}");
        assert_eq!(plan.maps.len(), 1);
        assert_eq!(
            (plan.maps[0].region, plan.maps[0].host_va, plan.maps[0].dev_va),
            (second.app.start, A + 2 * CHUNK, D)
        );
        pt.commit_map(&plan);
        assert_eq!(pt.lookup(A + 2 * CHUNK + half).map(|m| m.chunk), Some(9));
        assert_eq!(pt.translate(A + 2 * CHUNK + half + 8), Some(D + half + 8), "the offset in the window kept");
        assert_eq!(pt.mapped().filter(|m| m.chunk == 9).count(), 1, "chunk 9 mapped once");
        // Its pages elsewhere in the chunk are refused at other offsets.
        assert!(pt.plan_map(&[entry(A + 2 * CHUNK + half, half, 9 * CHUNK, rw)], 16).is_err());
    }
}
