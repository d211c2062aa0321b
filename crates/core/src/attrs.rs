//! Range attributes (advice) stored apart from the OS's mappings: an interval map from virtual
//! ranges to [`Attrs`], split where a new setting starts or ends and merged where neighbours end
//! up equal (AMD KFD's split, plus the merge KFD lacks).

use std::collections::BTreeMap;

use crate::types::{Proc, ProcMask, VaRange};

/// Advice in force on a range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attrs {
    /// Where the data should live when it is not being duplicated.
    pub preferred: Option<Proc>,
    /// Read duplication: readers get their own copies; the first write collapses them.
    pub read_mostly: bool,
    /// Processors that keep a mapping wherever the data lives (remote access instead of migrating).
    pub accessed_by: ProcMask,
    /// Never evicted while set.
    pub pinned: bool,
}

/// Interval map of attributes. Ranges absent from the map have default attributes.
#[derive(Debug, Default)]
pub struct RangeAttrs {
    /// start -> (end, attrs); ranges never overlap.
    map: BTreeMap<u64, (u64, Attrs)>,
}

impl RangeAttrs {
    /// Attributes at `va`.
    pub fn get(&self, va: u64) -> Attrs {
        match self.map.range(..=va).next_back() {
            Some((_, (end, a))) if *end > va => *a,
            _ => Attrs::default(),
        }
    }

    /// The attributes of every page of `range` when they are all the same (one lookup instead
    /// of one a page); None when the range spans stored ranges, or their edges.
    fn uniform(&self, range: VaRange) -> Option<Attrs> {
        match self.map.range(..=range.start).next_back() {
            Some((_, (end, a))) if *end > range.start => (*end >= range.end()).then_some(*a),
            // In a gap: default attributes unless a stored range starts inside.
            _ => self.map.range(range.start..range.end()).next().is_none().then_some(Attrs::default()),
        }
    }

    /// Page-by-page lookups inside `range`: one lookup in all when the range is uniform.
    pub fn within(&self, range: VaRange) -> Within<'_> {
        Within { attrs: self, uniform: self.uniform(range) }
    }

    /// Whether any range carries non-default attributes (fast path for the common case).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether `pred` holds for the attributes of every part of `range` (default attributes
    /// where nothing is stored).
    pub fn all_in(&self, range: VaRange, pred: impl Fn(&Attrs) -> bool) -> bool {
        let (s, e) = (range.start, range.end());
        let mut cur = s;
        let first = self.map.range(..=s).next_back().filter(|(_, (end, _))| *end > s);
        for (&k, (end, a)) in first.into_iter().chain(self.map.range(s.saturating_add(1)..e)) {
            if k.max(s) > cur && !pred(&Attrs::default()) {
                return false;
            }
            if !pred(a) {
                return false;
            }
            cur = cur.max(*end);
        }
        cur >= e || pred(&Attrs::default())
    }

    /// Whether any part of `range` is pinned.
    pub fn any_pinned(&self, range: VaRange) -> bool {
        !self.is_empty() && !self.all_in(range, |a| !a.pinned)
    }

    /// How prefetching `span` to `to` fits the advice on it: `(allowed, read_mostly)`. Allowed
    /// unless some part prefers another processor or keeps remote mappings (`AccessedBy`);
    /// read-mostly (prefetch as duplicates) when every part is.
    pub fn prefetch_fit(&self, span: VaRange, to: Proc) -> (bool, bool) {
        if self.is_empty() {
            return (true, false);
        }
        let allowed = self.all_in(span, |a| a.preferred.is_none_or(|p| p == to) && a.accessed_by.is_empty());
        (allowed, self.all_in(span, |a| a.read_mostly))
    }

    /// Applies `f` to the attributes of every part of `range`.
    pub fn update(&mut self, range: VaRange, mut f: impl FnMut(&mut Attrs)) {
        let (s, e) = (range.start, range.end());
        self.split_at(s);
        self.split_at(e);
        // Fill gaps with default entries so every byte of the range has one.
        let mut cur = s;
        let keys: Vec<u64> = self.map.range(s..e).map(|(k, _)| *k).collect();
        let mut pieces: Vec<(u64, u64, Attrs)> = Vec::new();
        for k in keys {
            let (end, a) = self.map[&k];
            if k > cur {
                pieces.push((cur, k, Attrs::default()));
            }
            pieces.push((k, end, a));
            cur = end;
        }
        if cur < e {
            pieces.push((cur, e, Attrs::default()));
        }
        for (ps, pe, mut a) in pieces {
            f(&mut a);
            if a == Attrs::default() {
                self.map.remove(&ps);
            } else {
                self.map.insert(ps, (pe, a));
            }
        }
        self.merge_around(s, e);
    }

    /// Forgets everything in `range` (the memory was freed).
    pub fn clear(&mut self, range: VaRange) {
        self.update(range, |a| *a = Attrs::default());
    }

    /// Moves the attributes of `[from, from + len)` to `[to, to + len)` (the program moved the
    /// memory with `mremap`): the old range keeps none, and whatever the new range had is
    /// replaced.
    pub fn move_range(&mut self, from: u64, to: u64, len: u64) {
        let old = VaRange::new(from, len);
        self.split_at(old.start);
        self.split_at(old.end());
        let pieces: Vec<(u64, u64, Attrs)> =
            self.map.range(old.start..old.end()).map(|(k, (e, a))| (*k, *e, *a)).collect();
        self.clear(old);
        self.clear(VaRange::new(to, len));
        for (s, e, a) in pieces {
            self.update(VaRange::new(to + (s - from), e - s), |x| *x = a);
        }
    }

    /// Drops `p` from every range's advice (its preferred location, its accessed-by bit): the
    /// device was detached, and the id may go to the next device attached, which must not
    /// inherit advice given for another.
    pub fn forget_proc(&mut self, p: Proc) {
        if self.map.values().any(|(_, a)| a.preferred == Some(p) || a.accessed_by.has(p)) {
            self.update(VaRange::new(0, u64::MAX), |a| {
                if a.preferred == Some(p) {
                    a.preferred = None;
                }
                a.accessed_by.remove(p);
            });
        }
    }

    /// Number of stored ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn split_at(&mut self, at: u64) {
        if let Some((&k, &(end, a))) = self.map.range(..at).next_back() {
            if end > at {
                self.map.insert(k, (at, a));
                self.map.insert(at, (end, a));
            }
        }
    }

    fn merge_around(&mut self, s: u64, e: u64) {
        let mut k = self.map.range(..s).next_back().map_or(s, |(k, _)| *k);
        while let Some((&k2, &(end, a))) = self.map.range(k..).next() {
            if k2 > e {
                break;
            }
            match self.map.get(&end) {
                Some(&(nend, na)) if na == a => {
                    self.map.remove(&end);
                    self.map.insert(k2, (nend, a));
                    k = k2;
                }
                _ => k = k2 + 1,
            }
        }
    }
}

/// Attributes of the pages of one range (see [`RangeAttrs::within`]).
#[derive(Debug)]
pub struct Within<'a> {
    attrs: &'a RangeAttrs,
    uniform: Option<Attrs>,
}

impl Within<'_> {
    /// Attributes at `va` (inside the range).
    #[inline]
    pub fn get(&self, va: u64) -> Attrs {
        self.uniform.unwrap_or_else(|| self.attrs.get(va))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn split_and_merge() {
        let mut m = RangeAttrs::default();
        m.update(VaRange::new(0x1000, 0x4000), |a| a.pinned = true);
        m.update(VaRange::new(0x2000, 0x1000), |a| a.read_mostly = true);
        assert_eq!(m.len(), 3);
        assert!(m.get(0x2500).pinned && m.get(0x2500).read_mostly);
        assert!(!m.get(0x3500).read_mostly);
        m.update(VaRange::new(0x2000, 0x1000), |a| a.read_mostly = false);
        assert_eq!(m.len(), 1, "merged back");
        m.clear(VaRange::new(0, 0x10000));
        assert!(m.is_empty());
    }

    #[test]
    fn a_move_takes_the_attributes_along() {
        let mut m = RangeAttrs::default();
        m.update(VaRange::new(0x1000, 0x4000), |a| a.pinned = true);
        m.update(VaRange::new(0x2000, 0x1000), |a| a.read_mostly = true);
        m.update(VaRange::new(0x10_0000, 0x8000), |a| a.preferred = Some(Proc::Cpu));
        // The middle of the pinned range moves onto part of the preferring one.
        m.move_range(0x2000, 0x10_1000, 0x2000);
        assert!(m.get(0x1000).pinned && !m.get(0x2000).pinned && !m.get(0x3000).pinned && m.get(0x4000).pinned);
        let moved = m.get(0x10_1000);
        assert!(moved.pinned && moved.read_mostly && moved.preferred.is_none(), "{moved:?}");
        assert!(m.get(0x10_2000).pinned && !m.get(0x10_2000).read_mostly);
        assert_eq!(m.get(0x10_3000).preferred, Some(Proc::Cpu));
        assert_eq!(m.get(0x10_0000).preferred, Some(Proc::Cpu));
    }

    #[test]
    fn prefetch_fit_follows_the_advice() {
        let (dev, span) = (Proc::Device(crate::types::DeviceId(0)), VaRange::new(0x10_0000, 0x4000));
        let mut m = RangeAttrs::default();
        assert_eq!(m.prefetch_fit(span, dev), (true, false));
        m.update(VaRange::new(0x10_0000, 0x2000), |a| a.read_mostly = true);
        assert_eq!(m.prefetch_fit(span, dev), (true, false), "half read-mostly");
        m.update(span, |a| a.read_mostly = true);
        assert_eq!(m.prefetch_fit(span, dev), (true, true));
        m.update(VaRange::new(0x10_3000, 0x1000), |a| a.preferred = Some(Proc::Cpu));
        assert_eq!(m.prefetch_fit(span, dev), (false, true), "a page prefers the CPU");
        assert_eq!(m.prefetch_fit(span, Proc::Cpu), (true, true));
    }

    proptest! {
        #[test]
        fn matches_a_per_page_model(ops in proptest::collection::vec((0u64..64, 1u64..16, any::<bool>(), any::<bool>()), 1..40)) {
            let mut m = RangeAttrs::default();
            let mut model = vec![Attrs::default(); 80];
            for (start, len, pin, rm) in ops {
                m.update(VaRange::new(start * 4096, len * 4096), |a| { a.pinned = pin; a.read_mostly = rm; });
                for p in start..start + len {
                    model[p as usize].pinned = pin;
                    model[p as usize].read_mostly = rm;
                }
            }
            for (p, want) in model.iter().enumerate() {
                prop_assert_eq!(m.get(p as u64 * 4096), *want);
            }
            // `all_in` agrees with the model on windows of pages.
            for s in (0..80u64).step_by(7) {
                for len in [1u64, 3, 16, 40] {
                    let end = (s + len).min(80);
                    let r = VaRange::new(s * 4096, (end - s) * 4096);
                    let pages = &model[s as usize..end as usize];
                    prop_assert_eq!(m.all_in(r, |a| a.pinned), pages.iter().all(|a| a.pinned));
                    prop_assert_eq!(m.all_in(r, |a| !a.read_mostly), pages.iter().all(|a| !a.read_mostly));
                    // `uniform`, when it answers, is every page's attributes; it answers for any
                    // window inside one stored range or one gap.
                    match m.uniform(r) {
                        Some(a) => prop_assert!(pages.iter().all(|p| *p == a)),
                        None => prop_assert!(pages.iter().any(|p| *p != pages[0]) || m.map.range(..r.end()).any(|(k, (e, _))| *e > r.start && (*k > r.start || *e < r.end()))),
                    }
                }
            }
            // Stored ranges never overlap and adjacent ones differ.
            let v: Vec<_> = m.map.iter().map(|(k, (e, a))| (*k, *e, *a)).collect();
            for w in v.windows(2) {
                prop_assert!(w[0].1 <= w[1].0);
                prop_assert!(!(w[0].1 == w[1].0 && w[0].2 == w[1].2));
            }
        }
    }

    /// Every operation (field updates that read the old value, clears, moves, overlapping
    /// moves) against a per-page model; `within`, `all_in`, `prefetch_fit` and the map's
    /// invariants too.
    #[derive(Clone, Debug)]
    enum Op {
        Pref(u64, u64, Option<u8>),
        Toggle(u64, u64, u8),
        Pin(u64, u64, bool),
        Rm(u64, u64, bool),
        Clear(u64, u64),
        Move(u64, u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..64, 1u64..16, proptest::option::of(0u8..3)).prop_map(|(s, l, p)| Op::Pref(s, l, p)),
            (0u64..64, 1u64..16, 0u8..3).prop_map(|(s, l, d)| Op::Toggle(s, l, d)),
            (0u64..64, 1u64..16, any::<bool>()).prop_map(|(s, l, b)| Op::Pin(s, l, b)),
            (0u64..64, 1u64..16, any::<bool>()).prop_map(|(s, l, b)| Op::Rm(s, l, b)),
            (0u64..64, 1u64..16).prop_map(|(s, l)| Op::Clear(s, l)),
            (0u64..64, 0u64..64, 1u64..16).prop_map(|(f, t, l)| Op::Move(f, t, l)),
        ]
    }

    fn proc_of(p: u8) -> Proc {
        if p == 0 {
            Proc::Cpu
        } else {
            Proc::Device(crate::types::DeviceId(p - 1))
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn every_operation_matches_a_per_page_model(ops in proptest::collection::vec(op(), 1..30)) {
            const P: u64 = 4096;
            let mut m = RangeAttrs::default();
            let mut model = vec![Attrs::default(); 96];
            for o in ops {
                match o {
                    Op::Pref(s, l, p) => {
                        let p = p.map(proc_of);
                        m.update(VaRange::new(s * P, l * P), |a| a.preferred = p);
                        for a in &mut model[s as usize..(s + l) as usize] { a.preferred = p; }
                    }
                    Op::Toggle(s, l, d) => {
                        let p = Proc::Device(crate::types::DeviceId(d));
                        let f = |a: &mut Attrs| if a.accessed_by.has(p) { a.accessed_by.remove(p) } else { a.accessed_by.insert(p) };
                        m.update(VaRange::new(s * P, l * P), f);
                        for a in &mut model[s as usize..(s + l) as usize] { f(a); }
                    }
                    Op::Pin(s, l, b) => {
                        m.update(VaRange::new(s * P, l * P), |a| a.pinned = b);
                        for a in &mut model[s as usize..(s + l) as usize] { a.pinned = b; }
                    }
                    Op::Rm(s, l, b) => {
                        m.update(VaRange::new(s * P, l * P), |a| a.read_mostly = b);
                        for a in &mut model[s as usize..(s + l) as usize] { a.read_mostly = b; }
                    }
                    Op::Clear(s, l) => {
                        m.clear(VaRange::new(s * P, l * P));
                        for a in &mut model[s as usize..(s + l) as usize] { *a = Attrs::default(); }
                    }
                    Op::Move(f, t, l) => {
                        m.move_range(f * P, t * P, l * P);
                        let old: Vec<Attrs> = model[f as usize..(f + l) as usize].to_vec();
                        for a in &mut model[f as usize..(f + l) as usize] { *a = Attrs::default(); }
                        model[t as usize..(t + l) as usize].copy_from_slice(&old);
                    }
                }
                for (p, want) in model.iter().enumerate() {
                    prop_assert_eq!(m.get(p as u64 * P), *want, "page {}", p);
                }
                let v: Vec<_> = m.map.iter().map(|(k, (e, a))| (*k, *e, *a)).collect();
                for x in &v {
                    prop_assert!(x.0 < x.1 && x.2 != Attrs::default(), "{:?}", v);
                }
                for w in v.windows(2) {
                    prop_assert!(w[0].1 <= w[1].0, "{:?}", v);
                    prop_assert!(!(w[0].1 == w[1].0 && w[0].2 == w[1].2), "unmerged {:?}", v);
                }
            }
            let dev = Proc::Device(crate::types::DeviceId(0));
            for s in 0..96u64 {
                for e in s + 1..=96 {
                    let r = VaRange::new(s * P, (e - s) * P);
                    let pages = &model[s as usize..e as usize];
                    let w = m.within(r);
                    for (i, a) in pages.iter().enumerate() {
                        prop_assert_eq!(w.get((s + i as u64) * P), *a);
                    }
                    prop_assert_eq!(m.all_in(r, |a| a.pinned), pages.iter().all(|a| a.pinned));
                    prop_assert_eq!(m.all_in(r, |a| a.preferred.is_none()), pages.iter().all(|a| a.preferred.is_none()));
                    let allowed = pages.iter().all(|a| a.preferred.is_none_or(|p| p == dev) && a.accessed_by.is_empty());
                    let rm = pages.iter().all(|a| a.read_mostly);
                    prop_assert_eq!(m.prefetch_fit(r, dev), (allowed, rm));
                }
            }
        }
    }

    #[test]
    fn forget_proc_drops_only_that_processor() {
        let d0 = Proc::Device(crate::types::DeviceId(0));
        let d1 = Proc::Device(crate::types::DeviceId(1));
        let mut m = RangeAttrs::default();
        m.update(VaRange::new(0x1000, 0x4000), |a| a.preferred = Some(d0));
        m.update(VaRange::new(0x3000, 0x4000), |a| {
            a.accessed_by.insert(d0);
            a.accessed_by.insert(d1);
        });
        m.update(VaRange::new(0x10_0000, 0x1000), |a| a.preferred = Some(d1));
        m.update(VaRange::new(0x20_0000, 0x1000), |a| a.accessed_by.insert(d0));
        m.forget_proc(d0);
        for va in [0x1000, 0x3000, 0x6000, 0x20_0000] {
            let a = m.get(va);
            assert!(a.preferred != Some(d0) && !a.accessed_by.has(d0), "{va:#x}: {a:?}");
        }
        assert!(m.get(0x3000).accessed_by.has(d1) && m.get(0x6000).accessed_by.has(d1));
        assert_eq!(m.get(0x10_0000).preferred, Some(d1));
        assert_eq!(m.get(0x20_0000), Attrs::default());
        // [0x3000, 0x7000) accessed by d1, [0x10_0000, +0x1000) preferring d1: merged, the rest gone.
        assert_eq!(m.len(), 2, "{m:?}");
    }
}
