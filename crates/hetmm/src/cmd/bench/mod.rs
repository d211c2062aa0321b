//! `hetmm bench`: every figure beside the limit it is judged against, measured in the same
//! process (memcpy bandwidth, the bandwidth of copying freshly written 4 KiB host backing through
//! the manager's alias as the copy engine does, and the raw userfaultfd round trip, once at
//! start).
//!
//! Workloads (each starts with its data written by the CPU, and checks its result):
//! - `stream`: a kernel reads A and writes B = f(A) through device faults (row `stream`); then
//!   the CPU reads B (half the working set, written by the device) back (row
//!   `stream/cpu-reread`).
//! - `random`: GUPS-style atomic adds at pseudo-random indices of one table.
//! - `gemm`: the banded r = a x b (every band re-reads b), m from `--size`, at most 1024.
//! - `stencil`: Jacobi sweeps of a 2D 5-point stencil over two u32 grids.
//! - `graph`: a level-synchronous BFS over a pseudo-random CSR graph.
//! - `pingpong`: device and CPU take turns reading one buffer; with no advice and with
//!   `ReadMostly`.
//! - `readmostly`: CPU threads and a kernel read one buffer at once; the same two variants.
//! - `faultback`: the CPU fault-back path per fault-around chunk size (at oversub 0.5 only).
//!
//! Each run gets a fresh address space and a simulated device of `working set / oversub` bytes
//! in whole 2 MiB blocks (rounded up at oversub 1 and below, so the data fits; to the nearest
//! block above). `seconds` times the workload's own section (the kernels; for
//! `pingpong`/`readmostly` the rounds; for `stream/cpu-reread` and `faultback` the CPU's
//! reads), never the set-up or the check. `bytes` are the bytes that section reads and writes
//! as the program sees them; `gbps` = bytes / seconds; `ratio_to_limit` = gbps / memcpy GB/s.
//! memcpy's GB/s counts each byte copied once, so rows whose section reads data the device or
//! the CPU already holds (`readmostly`, `pingpong`) can exceed 1; for `stream` the bytes are the
//! bytes migrated, and the ratio is the fraction of memcpy the bars mean.
//! Rows report medians over `--repeat`, with the counters of the median repeat.

mod cpuuse;
mod faultback;
mod svg;
mod workloads;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use hetmm::core::stats::StatsSnapshot;
use hetmm::host::probe;
use hetmm::Policy;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Map, Value};

use workloads::{AdviceKind, Cache, Run, Sample};

/// Every workload, in the order `all` runs them.
pub const WORKLOADS: [&str; 8] =
    ["stream", "random", "gemm", "stencil", "graph", "pingpong", "readmostly", "faultback"];

/// Options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Workloads, comma-separated, or `all`: stream, random, gemm, stencil, graph, pingpong,
    /// readmostly, faultback.
    #[arg(long, default_value = "all")]
    workload: String,
    /// Device: `sim`, or `cuda` for the GPU section (workloads copy, mul_mat, stream, oversub).
    #[arg(long, default_value = "sim")]
    device: String,
    /// GPU memory hetmm may use with `--device cuda` (the `oversub` working set is 1.5x this).
    #[arg(long, value_parser = super::size_arg, default_value = "1G")]
    pub(crate) device_mem: u64,
    /// Matrix size for `mul_mat` with `--device cuda`.
    #[arg(long, default_value_t = 1024)]
    pub(crate) m: usize,
    /// Policies, comma-separated (hetmm, uvm).
    #[arg(long, default_value = "hetmm,uvm")]
    policy: String,
    /// Oversubscription factors (working set / device memory), comma-separated.
    #[arg(long, default_value = "0.5,1,1.5,2")]
    oversub: String,
    /// Working set in bytes (e.g. 256M, 1G).
    #[arg(long, value_parser = super::size_arg, default_value = "256M")]
    size: u64,
    /// Bandwidth (GB/s) of the simulated device's link to host memory, which its remote accesses
    /// cross; 0: remote accesses cost what local ones do.
    #[arg(long, default_value_t = hetmm::sim::DEFAULT_LINK_GBPS)]
    link_gbps: u32,
    /// Repeats of each run (medians are reported), 1 to 1000 (more wrapped the GPU path's
    /// loop count around to none, and it reported runs that never ran as verified).
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    repeat: usize,
    /// One JSON object per run on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Draws median seconds against oversubscription, one line per policy, into this SVG file.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

impl Args {
    pub(crate) fn workload(&self) -> &str {
        &self.workload
    }
    pub(crate) fn size(&self) -> u64 {
        self.size
    }
    pub(crate) fn repeat(&self) -> usize {
        self.repeat.max(1)
    }
    pub(crate) fn json(&self) -> bool {
        self.json
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        // An even count has two middle values: the median is their mean.
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 => format!("{}K", b >> 10),
        b => format!("{b}"),
    }
}

fn list(s: &str) -> Vec<String> {
    s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()
}

/// What the command line asked for, checked.
struct Plan {
    workloads: Vec<&'static str>,
    policies: Vec<&'static str>,
    oversubs: Vec<f64>,
}

fn plan(args: &Args) -> Result<Plan, String> {
    if args.device != "sim" {
        return Err(format!("unknown device '{}' (sim, cuda)", args.device));
    }
    let mut workloads = Vec::new();
    for w in list(&args.workload) {
        let named: Vec<&'static str> = if w == "all" {
            WORKLOADS.to_vec()
        } else {
            let known = WORKLOADS
                .iter()
                .find(|k| **k == w)
                .ok_or_else(|| format!("unknown workload '{w}' (known: {}, all)", WORKLOADS.join(", ")))?;
            vec![*known]
        };
        // A workload named twice runs once: its runs would be merged into the same rows.
        for k in named {
            if !workloads.contains(&k) {
                workloads.push(k);
            }
        }
    }
    let mut policies = Vec::new();
    for p in list(&args.policy) {
        let known = Policy::NAMES
            .iter()
            .find(|k| **k == p)
            .ok_or_else(|| format!("unknown policy '{p}' (known: {})", Policy::NAMES.join(", ")))?;
        if !policies.contains(known) {
            policies.push(*known);
        }
    }
    let mut oversubs = Vec::new();
    for o in list(&args.oversub) {
        let v: f64 = o.parse().map_err(|_| format!("--oversub: not a number: '{o}'"))?;
        if !(v.is_finite() && v > 0.0 && v <= 64.0) {
            return Err(format!("--oversub: {v} is out of range (0, 64]"));
        }
        // Rows are keyed by the factor in thousandths: factors equal to that precision are one.
        if !oversubs.iter().any(|&o: &f64| milli(o) == milli(v)) {
            oversubs.push(v);
        }
    }
    if workloads.is_empty() || policies.is_empty() || oversubs.is_empty() {
        return Err("--workload, --policy and --oversub each need at least one value".into());
    }
    if args.size < (1 << 20) {
        return Err(format!("--size {} is too small (at least 1M)", args.size));
    }
    // Every run holds the working set in host memory and prefaults a simulated device of
    // `size / oversub` bytes there too: a machine with less memory than both together can only
    // get the process killed by the OOM killer (and a size near 2^64 overflowed before that).
    // The CPU's reference results come on top, in working sets: those cached for the whole run
    // (stencil's three grids, 1.5; graph's arrays, 1; gemm's product, 1/3) and the largest one
    // made per run (random's table, 1); and the limits' probes, about 1 GiB.
    if let Some(total) = super::memory_total() {
        let fixed = workloads.contains(&"faultback").then_some(faultback::OVERSUB);
        let cached: f64 = workloads
            .iter()
            .map(|w| match *w {
                "stencil" => 1.5,
                "graph" => 1.0,
                "gemm" => 1.0 / 3.0,
                _ => 0.0,
            })
            .sum();
        let per_run = if workloads.contains(&"random") { 1.0 } else { 0.0 };
        let probes = (1u64 << 30) as f64;
        for &o in oversubs.iter().chain(&fixed) {
            let need = args.size as f64 * (1.0 + 1.0 / o + cached + per_run) + probes;
            if need > total as f64 {
                return Err(format!(
                    "--size {} at --oversub {o} needs at least {:.0} MiB of memory (working set, device \
                     memory, the CPU's reference results and the probes); this machine has {} MiB",
                    human(args.size),
                    need / (1u64 << 20) as f64,
                    total >> 20
                ));
            }
        }
    }
    Ok(Plan { workloads, policies, oversubs })
}

/// An oversubscription factor in thousandths, as rows are keyed.
fn milli(oversub: f64) -> u64 {
    (oversub * 1000.0).round() as u64
}

/// One (workload, policy, oversub, advice) combination: the unit whose repeats are aggregated.
#[derive(Clone, Copy, Debug)]
struct Job {
    workload: &'static str,
    policy: &'static str,
    oversub: f64,
    advice: AdviceKind,
}

impl Plan {
    fn jobs(&self) -> Vec<Job> {
        let mut out = Vec::new();
        for &workload in &self.workloads {
            let advices: &[AdviceKind] = match workload {
                "pingpong" | "readmostly" => &[AdviceKind::None, AdviceKind::ReadMostly],
                _ => &[AdviceKind::None],
            };
            let oversubs = if workload == "faultback" { vec![faultback::OVERSUB] } else { self.oversubs.clone() };
            for &oversub in &oversubs {
                for &policy in &self.policies {
                    for &advice in advices {
                        out.push(Job { workload, policy, oversub, advice });
                    }
                }
            }
        }
        out
    }
}

fn run_one(job: &Job, r: &Run, cache: &mut Cache, uffd_us: f64) -> workloads::Result<Vec<Sample>> {
    match job.workload {
        "stream" => workloads::stream(r),
        "random" => workloads::random(r),
        "gemm" => workloads::gemm(r, cache),
        "stencil" => workloads::stencil(r, cache),
        "graph" => workloads::graph(r, cache),
        "pingpong" => workloads::pingpong(r),
        "readmostly" => workloads::readmostly(r),
        "faultback" => faultback::faultback(r, uffd_us),
        other => unreachable!("workload {other} is checked by plan()"),
    }
}

/// Key of an output row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RowKey {
    order: usize,
    /// Position of the row among those its workload reports.
    sub: usize,
    row: String,
    oversub_milli: u64,
    policy: &'static str,
    advice: AdviceKind,
}

/// A row: the medians of one key's repeats.
#[derive(Debug)]
struct Row {
    key: RowKey,
    oversub: f64,
    samples: Vec<Sample>,
    errors: Vec<String>,
}

impl Row {
    fn verified(&self) -> bool {
        self.errors.is_empty() && !self.samples.is_empty() && self.samples.iter().all(|s| s.verified)
    }

    /// The sample with the median time (of an even count, the upper of the two middle ones): its
    /// counters are reported.
    fn mid(&self) -> Option<&Sample> {
        let mut v: Vec<&Sample> = self.samples.iter().collect();
        v.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        v.get(v.len() / 2).copied()
    }

    /// The median seconds over the repeats.
    fn seconds(&self) -> f64 {
        median(self.samples.iter().map(|s| s.seconds).collect())
    }

    /// Bytes (the same every repeat) over the median seconds.
    fn gbps(&self) -> f64 {
        self.mid().map_or(f64::NAN, |s| s.bytes as f64 / self.seconds() / 1e9)
    }

    fn stats(&self) -> StatsSnapshot {
        self.mid().map(|s| s.stats).unwrap_or_default()
    }

    /// Working set over the device memory the runs actually had (device memory is whole 2 MiB
    /// blocks, so small working sets get less oversubscription than asked); the factor asked for
    /// where no run reported its sizes.
    fn effective_oversub(&self) -> f64 {
        match self.mid() {
            Some(s) if s.device_memory > 0 && s.working_set > 0 => s.working_set as f64 / s.device_memory as f64,
            _ => self.oversub,
        }
    }

    fn migrated(&self) -> u64 {
        migrated(&self.stats())
    }

    /// Bytes the device accessed in host memory mapped remotely, in the median repeat.
    fn remote(&self) -> u64 {
        self.mid().and_then(|s| s.extra.get("remote_bytes")).and_then(Value::as_u64).unwrap_or(0)
    }

    fn workload(&self) -> &str {
        self.key.row.split('/').next().unwrap_or_default()
    }

    fn variant(&self) -> Option<&str> {
        self.key.row.split_once('/').map(|(_, v)| v)
    }

    fn json(&self, limits: &Limits, extra_fields: &Map<String, Value>) -> Value {
        let st = self.stats();
        let mid = self.mid();
        let g = self.gbps();
        let mut o = json!({
            "workload": self.workload(),
            "variant": self.variant(),
            "device": "sim",
            "policy": self.key.policy,
            "advice": self.key.advice.name(),
            "oversub": self.oversub,
            "bytes": mid.map_or(0, |s| s.bytes),
            "working_set": mid.map_or(0, |s| s.working_set),
            "device_memory": mid.map_or(0, |s| s.device_memory),
            "effective_oversub": self.effective_oversub(),
            "seconds": self.seconds(),
            "seconds_all": self.samples.iter().map(|s| s.seconds).collect::<Vec<_>>(),
            // Per repeat, beside `seconds_all`: whether a slow repeat did more work itself or
            // lost the CPUs to something else (see `cpuuse`).
            "cpu_seconds_all": self.samples.iter().map(|s| s.cpu.own).collect::<Vec<_>>(),
            "others_cpu_seconds_all": self.samples.iter().map(|s| s.cpu.others).collect::<Vec<_>>(),
            "steal_seconds_all": self.samples.iter().map(|s| s.cpu.steal).collect::<Vec<_>>(),
            // And whether it moved more: the migration work of each repeat.
            "bytes_moved_all": self.samples.iter().map(|s| migrated(&s.stats)).collect::<Vec<_>>(),
            "device_faults_all": self.samples.iter().map(|s| s.stats.device_faults).collect::<Vec<_>>(),
            "evictions_all": self.samples.iter().map(|s| s.stats.evictions).collect::<Vec<_>>(),
            "remote_bytes_all": self.samples.iter().map(|s| s.extra.get("remote_bytes").and_then(Value::as_u64).unwrap_or(0)).collect::<Vec<_>>(),
            "repeats": self.samples.len(),
            "gbps": g,
            "limit_gbps": limits.memcpy_gbps,
            "ratio_to_limit": g / limits.memcpy_gbps,
            "backing_copy_gbps": limits.backing_gbps,
            "uffd_round_trip_us": limits.uffd_us,
            "verified": self.verified(),
            "stats": {
                "cpu_faults": st.cpu_faults,
                "device_faults": st.device_faults,
                "fault_batches": st.fault_batches,
                "bytes_to_device": st.bytes_to_device,
                "bytes_to_host": st.bytes_to_host,
                "evictions": st.evictions,
                "prefetched_bytes": st.prefetched_pages * hetmm::core::types::PAGE_SIZE,
                "thrash_events": st.thrash_events,
            },
            "detail": st,
        });
        let obj = o.as_object_mut().expect("a JSON object");
        if let Some(m) = mid {
            for (k, v) in &m.extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in extra_fields {
            obj.insert(k.clone(), v.clone());
        }
        if !self.errors.is_empty() {
            obj.insert("errors".into(), json!(self.errors));
        }
        o
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    memcpy_gbps: f64,
    /// Reading freshly written 4 KiB host backing through the alias (the copy engine's source).
    backing_gbps: f64,
    uffd_us: f64,
}

pub fn run(args: &Args) -> Result<ExitCode, hetmm::Error> {
    if args.device == "cuda" {
        return super::bench_cuda::run(args);
    }
    let plan = match plan(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hetmm bench: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let repeat = args.repeat.max(1);
    let memcpy_gbps = probe::memcpy_bandwidth(256 << 20, 5) / 1e9;
    let rt: Vec<f64> = probe::raw_uffd_round_trip(2000)?.into_iter().map(|d| d.as_secs_f64() * 1e6).collect();
    let backing_gbps = probe::backing_copy_bandwidth(256 << 20, 5, hetmm::sim::dma_copy)
        .map_err(hetmm::host::RegionError::from)?
        / 1e9;
    let limits = Limits { memcpy_gbps, backing_gbps, uffd_us: median(rt) };
    if !args.json {
        println!(
            "limits: memcpy {:.2} GB/s, copy from fresh host backing {:.2} GB/s, raw userfaultfd round trip {:.1} us \
             (median); working set {}, {} repeat(s), device sim (link to host memory: {})",
            limits.memcpy_gbps,
            limits.backing_gbps,
            limits.uffd_us,
            human(args.size),
            repeat,
            if args.link_gbps > 0 { format!("{} GB/s", args.link_gbps) } else { "free".into() }
        );
    }

    let jobs = plan.jobs();
    let bar = if args.json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some((jobs.len() * repeat) as u64), ProgressDrawTarget::stderr())
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );

    let mut cache = Cache::default();
    let mut rows: BTreeMap<RowKey, Row> = BTreeMap::new();
    for job in &jobs {
        let order = WORKLOADS.iter().position(|w| *w == job.workload).unwrap_or(usize::MAX);
        let mut errors = Vec::new();
        let mut got: Vec<Sample> = Vec::new();
        for rep in 0..repeat {
            bar.set_message(format!(
                "{} {} x{} {} (repeat {}/{})",
                job.workload,
                job.policy,
                job.oversub,
                job.advice.name(),
                rep + 1,
                repeat
            ));
            let r = Run {
                policy: job.policy,
                oversub: job.oversub,
                size: args.size,
                advice: job.advice,
                rep,
                link_gbps: Some(args.link_gbps).filter(|g| *g > 0),
            };
            match run_one(job, &r, &mut cache, limits.uffd_us) {
                Ok(s) => got.extend(s),
                Err(e) => {
                    bar.suspend(|| eprintln!("hetmm bench: {} {} x{}: {e}", job.workload, job.policy, job.oversub));
                    errors.push(e.to_string());
                }
            }
            bar.inc(1);
        }
        let per_repeat = if job.workload == "faultback" {
            faultback::CHUNKS.len()
        } else {
            1 + usize::from(job.workload == "stream")
        };
        // A job that failed before producing any row still gets one (unverified).
        if got.is_empty() {
            let key = RowKey {
                order,
                sub: 0,
                row: job.workload.to_string(),
                oversub_milli: milli(job.oversub),
                policy: job.policy,
                advice: job.advice,
            };
            rows.insert(key.clone(), Row { key, oversub: job.oversub, samples: Vec::new(), errors });
            continue;
        }
        for (i, s) in got.into_iter().enumerate() {
            let key = RowKey {
                order,
                sub: i % per_repeat,
                row: s.row.clone(),
                oversub_milli: milli(job.oversub),
                policy: job.policy,
                advice: job.advice,
            };
            let row = rows.entry(key.clone()).or_insert_with(|| Row {
                key,
                oversub: job.oversub,
                samples: Vec::new(),
                errors: errors.clone(),
            });
            row.samples.push(s);
        }
    }
    bar.finish_and_clear();

    let rows: Vec<Row> = rows.into_values().collect();
    let extras = advice_ratios(&rows);
    if args.json {
        for (i, r) in rows.iter().enumerate() {
            println!("{}", r.json(&limits, &extras[i]));
        }
    } else {
        print_table(&rows, &limits, &extras);
        print_bars(&rows, &limits, args.size);
        print_spread(&rows);
    }
    if let Some(path) = &args.svg {
        let panels = svg_panels(&rows);
        match svg::write(path, &panels) {
            Ok(()) => {
                if !args.json {
                    println!("chart: {}", path.display());
                }
            }
            Err(e) => {
                eprintln!("hetmm bench: cannot write {}: {e}", path.display());
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.verified()).collect();
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for r in &failed {
            eprintln!(
                "hetmm bench: {} {} x{} {}: NOT VERIFIED{}",
                r.key.row,
                r.key.policy,
                r.oversub,
                r.key.advice.name(),
                if r.errors.is_empty() { String::new() } else { format!(" ({})", r.errors.join("; ")) }
            );
        }
        Ok(ExitCode::FAILURE)
    }
}

/// Bytes migrated each way, device to device included: the table's "MiB moved", the ReadMostly
/// cut and `bytes_moved_all` (which left out device-to-device bytes) all count these.
fn migrated(s: &StatsSnapshot) -> u64 {
    s.bytes_to_device + s.bytes_to_host + s.bytes_device_to_device
}

/// For each row with advice `read_mostly`, the bytes migrated without advice over those with
/// it (same workload, policy and oversub); fields to add to the rows' JSON. Only where both
/// rows verified: a failed run's counters are no measurement (its zero bytes made the ratio
/// whatever the other row moved).
fn advice_ratios(rows: &[Row]) -> Vec<Map<String, Value>> {
    rows.iter()
        .map(|r| {
            let mut m = Map::new();
            if r.key.advice == AdviceKind::ReadMostly && r.verified() {
                let base = rows.iter().find(|b| {
                    b.key.advice == AdviceKind::None
                        && b.key.row == r.key.row
                        && b.key.policy == r.key.policy
                        && b.key.oversub_milli == r.key.oversub_milli
                        && b.verified()
                });
                if let Some(b) = base {
                    let ratio = b.migrated() as f64 / (r.migrated().max(1)) as f64;
                    m.insert("bytes_migrated_no_advice".into(), json!(b.migrated()));
                    m.insert("migration_reduction".into(), json!(ratio));
                }
            }
            m
        })
        .collect()
}

fn print_table(rows: &[Row], limits: &Limits, extras: &[Map<String, Value>]) {
    println!(
        "{:<22} {:<6} {:<11} {:>11} {:>9} {:>8} {:>6} {:>9} {:>9} {:>6} {:>10} {:>10} {:>6}  verified",
        "workload",
        "policy",
        "advice",
        "oversub",
        "seconds",
        "GB/s",
        "ratio",
        "dev flt",
        "cpu flt",
        "evict",
        "MiB moved",
        "MiB remote",
        "rm x"
    );
    for (r, x) in rows.iter().zip(extras) {
        let st = r.stats();
        let rm = x.get("migration_reduction").and_then(Value::as_f64).map_or(String::from("-"), |v| format!("{v:.1}"));
        // The factor asked for, and what the runs had where that differs (device memory is
        // whole 2 MiB blocks: a small working set gets less).
        let eff = r.effective_oversub();
        let oversub = if (eff - r.oversub).abs() > 0.01 * r.oversub {
            format!("{} ({eff:.2})", r.oversub)
        } else {
            format!("{}", r.oversub)
        };
        println!(
            "{:<22} {:<6} {:<11} {:>11} {:>9.3} {:>8.2} {:>6.2} {:>9} {:>9} {:>6} {:>10.1} {:>10.1} {:>6}  {}",
            r.key.row,
            r.key.policy,
            r.key.advice.name(),
            oversub,
            r.seconds(),
            r.gbps(),
            r.gbps() / limits.memcpy_gbps,
            st.device_faults,
            st.cpu_faults,
            st.evictions,
            r.migrated() as f64 / (1u64 << 20) as f64,
            r.remote() as f64 / (1u64 << 20) as f64,
            rm,
            if r.verified() { "yes" } else { "NO" }
        );
    }
}

fn find<'a>(rows: &'a [Row], row: &str, policy: &str, oversub: f64, advice: AdviceKind) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.key.row == row && r.key.policy == policy && r.key.oversub_milli == milli(oversub) && r.key.advice == advice
    })
}

/// The bars, checked against this run's rows where it has them. A bar whose rows did not
/// all verify (a failed run has no times, a corrupting one no meaningful ones) is not met, and
/// says so.
fn print_bars(rows: &[Row], limits: &Limits, size: u64) {
    let lines = bars(rows, limits, size);
    if lines.is_empty() {
        return;
    }
    println!("bars (this run's medians; slower-than-uvm lines appear only where hetmm is):");
    for l in lines {
        println!("{l}");
    }
}

/// The lines of [`print_bars`].
fn bars(rows: &[Row], limits: &Limits, size: u64) -> Vec<String> {
    let mut lines = Vec::new();
    let mut bar = |ok: bool, what: String| lines.push(format!("  [{}] {what}", if ok { "met" } else { "NOT met" }));
    let unverified = |what: &str| format!("{what}: a run did not verify, so nothing is measured");
    let find = |row: &str, policy: &str, oversub: f64, advice: AdviceKind| find(rows, row, policy, oversub, advice);
    if let Some(r) = find("stream", "hetmm", 0.5, AdviceKind::None).filter(|r| !r.verified()) {
        bar(false, unverified(&format!("{} x0.5 (device-fault path and CPU re-read)", r.key.row)));
    }
    if let Some(r) = find("stream", "hetmm", 0.5, AdviceKind::None).filter(|r| r.verified()) {
        let x = r.gbps() / limits.memcpy_gbps;
        // Every byte the kernel touches is first copied from host backing: that copy's own
        // bandwidth is the ceiling, whatever the fault path does.
        let ceiling = limits.backing_gbps / limits.memcpy_gbps;
        bar(
            x >= 0.8,
            format!(
                "stream x0.5 device-fault path: {x:.2} of memcpy (bar 0.8); copying from fresh host backing alone runs at \
                 {ceiling:.2} of memcpy"
            ),
        );
    }
    if let Some(r) = find("stream/cpu-reread", "hetmm", 0.5, AdviceKind::None).filter(|r| r.verified()) {
        let x = r.gbps() / limits.memcpy_gbps;
        // The re-read covers B, half the working set.
        let note = if size / 2 < (1 << 30) {
            format!(" [re-read {} (--size {}); the bar's 1G needs --size 2G]", human(size / 2), human(size))
        } else {
            String::new()
        };
        bar(x >= 0.6, format!("stream x0.5 CPU re-read of device-resident data: {x:.2} of memcpy (bar 0.6){note}"));
    }
    let mut keys: Vec<(&str, u64, f64, AdviceKind)> = rows
        .iter()
        .filter(|r| r.key.policy == "hetmm")
        .map(|r| (r.key.row.as_str(), r.key.oversub_milli, r.oversub, r.key.advice))
        .collect();
    keys.dedup();
    for (row, _, o, advice) in keys {
        let (Some(h), Some(u)) = (find(row, "hetmm", o, advice), find(row, "uvm", o, advice)) else {
            continue;
        };
        if !h.verified() || !u.verified() {
            let label = format!("{row} x{o} {}", if advice == AdviceKind::None { "" } else { advice.name() });
            bar(false, unverified(&format!("{} hetmm against uvm", label.trim_end())));
            continue;
        }
        let speedup = u.seconds() / h.seconds();
        // The bars are about oversubscription the runs really had: a device rounded to whole
        // blocks may hold much more of a small working set than the factor says.
        let eff = h.effective_oversub().min(u.effective_oversub());
        let rounded = if (eff - o).abs() > 0.05 * o { format!(" [effective x{eff:.2}]") } else { String::new() };
        let label = format!("{row} x{o}{rounded} {}", if advice == AdviceKind::None { "" } else { advice.name() });
        let label = label.trim_end();
        let need = match row {
            "stream" if o >= 1.5 && eff >= 0.95 * 1.5 => Some(2.0),
            "gemm" if o >= 1.5 && eff >= 0.95 * 1.5 => Some(1.5),
            _ => None,
        };
        if let Some(n) = need {
            bar(speedup >= n, format!("{label}: hetmm {speedup:.2}x faster than uvm (bar {n}x)"));
        } else if speedup < 1.0 / 1.05 {
            bar(false, format!("{label}: hetmm {speedup:.2}x uvm's speed (slower by more than 5%)"));
        }
    }
    for r in rows.iter().filter(|r| r.key.advice == AdviceKind::ReadMostly) {
        if let Some(b) = find(&r.key.row, r.key.policy, r.oversub, AdviceKind::None) {
            if !r.verified() || !b.verified() {
                bar(
                    false,
                    unverified(&format!("{} {} x{}: ReadMostly against no advice", r.key.row, r.key.policy, r.oversub)),
                );
                continue;
            }
            let ratio = b.migrated() as f64 / r.migrated().max(1) as f64;
            bar(
                ratio >= 10.0,
                format!(
                    "{} {} x{}: ReadMostly migrates {ratio:.1}x fewer bytes than no advice (bar 10x)",
                    r.key.row, r.key.policy, r.oversub
                ),
            );
        }
    }
    lines
}

/// Rows whose slowest repeat took more than 1.5x their fastest, with where the CPUs went in
/// each: more CPU time of our own means hetmm did more work; more of others' time or of steal
/// means the machine gave the benchmark less.
fn print_spread(rows: &[Row]) {
    let mut lines = Vec::new();
    for r in rows.iter().filter(|r| r.samples.len() >= 2) {
        let by = |a: &&Sample, b: &&Sample| a.seconds.total_cmp(&b.seconds);
        let (Some(fast), Some(slow)) = (r.samples.iter().min_by(by), r.samples.iter().max_by(by)) else { continue };
        if slow.seconds <= 1.5 * fast.seconds {
            continue;
        }
        let cpu = |s: &Sample| {
            format!(
                "{:.1} ms (own CPU {:.1} ms, others {:.0} ms, steal {:.0} ms)",
                s.seconds * 1e3,
                s.cpu.own * 1e3,
                s.cpu.others * 1e3,
                s.cpu.steal * 1e3
            )
        };
        lines.push(format!(
            "  {} {} {} x{}: fastest {}, slowest {}",
            r.key.row,
            r.key.policy,
            r.key.advice.name(),
            r.oversub,
            cpu(fast),
            cpu(slow)
        ));
    }
    if !lines.is_empty() {
        println!("repeats more than 1.5x apart (others' CPU time and steal tick in 10 ms):");
        for l in lines {
            println!("{l}");
        }
    }
}

/// Panels for the chart: per row (faultback excluded), per policy and advice, median seconds
/// against the oversubscription the runs had (a device is whole 2 MiB blocks: a small working
/// set gets less than asked, as the table shows). Only rows that verified: a corrupting run's
/// time is no measurement.
fn svg_panels(rows: &[Row]) -> Vec<svg::Panel> {
    let mut panels: Vec<svg::Panel> = Vec::new();
    for r in rows.iter().filter(|r| r.workload() != "faultback" && r.verified()) {
        let idx = match panels.iter().position(|p| p.title == r.key.row) {
            Some(i) => i,
            None => {
                panels.push(svg::Panel { title: r.key.row.clone(), series: Vec::new() });
                panels.len() - 1
            }
        };
        let name = match r.key.advice {
            AdviceKind::None => r.key.policy.to_string(),
            a => format!("{} + {}", r.key.policy, a.name()),
        };
        let p = &mut panels[idx];
        match p.series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, pts)) => pts.push((r.effective_oversub(), r.seconds())),
            None => p.series.push((name, vec![(r.effective_oversub(), r.seconds())])),
        }
    }
    for p in &mut panels {
        for (_, pts) in &mut p.series {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    panels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seconds: &[f64]) -> Row {
        let key = RowKey {
            order: 0,
            sub: 0,
            row: "stream".into(),
            oversub_milli: 500,
            policy: "hetmm",
            advice: AdviceKind::None,
        };
        let samples = seconds
            .iter()
            .map(|&s| Sample {
                row: "stream".into(),
                seconds: s,
                bytes: 1_000_000_000,
                working_set: 0,
                device_memory: 0,
                verified: true,
                stats: StatsSnapshot::default(),
                cpu: Default::default(),
                extra: Map::new(),
            })
            .collect();
        Row { key, oversub: 0.5, samples, errors: Vec::new() }
    }

    /// `bytes_moved_all` (per repeat) and the table's "MiB moved" and the ReadMostly cut
    /// (`migrated`) are one measure: the bytes migrated each way, device to device included.
    /// `bytes_moved_all` left out `bytes_device_to_device`.
    #[test]
    fn bytes_moved_per_repeat_counts_what_the_table_counts() {
        let mut r = row(&[1.0]);
        r.samples[0].stats.bytes_to_device = 1 << 20;
        r.samples[0].stats.bytes_to_host = 2 << 20;
        r.samples[0].stats.bytes_device_to_device = 4 << 20;
        let limits = Limits { memcpy_gbps: 1.0, backing_gbps: 1.0, uffd_us: 1.0 };
        let j = r.json(&limits, &Map::new());
        assert_eq!(r.migrated(), 7 << 20);
        assert_eq!(j["bytes_moved_all"][0].as_u64(), Some(r.migrated()));
    }

    /// The median of an even count is the mean of the two middle values (it was the upper one:
    /// with `--repeat 2` every row reported its slower repeat).
    #[test]
    fn medians_of_even_and_odd_counts() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![7.0]), 7.0);
        assert!(median(Vec::new()).is_nan());
        let r = row(&[1.0, 3.0]);
        assert_eq!(r.seconds(), 2.0);
        assert_eq!(r.gbps(), 0.5);
        let r = row(&[5.0]);
        assert_eq!((r.seconds(), r.gbps()), (5.0, 0.2));
    }

    /// A bar is judged only on rows that verified: a ReadMostly run that failed (no samples,
    /// zero bytes) was "met" by millions of times, a failed hetmm run's NaN speedup dropped the
    /// slower-than-uvm line, and a corrupting run was timed as any other (found by an audit).
    #[test]
    fn bars_are_not_met_on_rows_that_did_not_verify() {
        let limits = Limits { memcpy_gbps: 1.0, backing_gbps: 1.0, uffd_us: 1.0 };
        let with = |mut r: Row, row: &str, policy: &'static str, advice: AdviceKind, oversub: f64| {
            r.key.row = row.into();
            r.key.policy = policy;
            r.key.advice = advice;
            r.key.oversub_milli = milli(oversub);
            r.oversub = oversub;
            r
        };
        let failed = |mut r: Row| {
            r.samples.clear();
            r.errors.push("failed".into());
            r
        };
        let corrupt = |mut r: Row| {
            r.samples[0].verified = false;
            r
        };
        let rows = vec![
            with(row(&[1.0]), "pingpong", "hetmm", AdviceKind::None, 0.5),
            with(failed(row(&[1.0])), "pingpong", "hetmm", AdviceKind::ReadMostly, 0.5),
            with(corrupt(row(&[0.1])), "stream", "hetmm", AdviceKind::None, 2.0),
            with(row(&[1.0]), "stream", "uvm", AdviceKind::None, 2.0),
            with(failed(row(&[1.0])), "gemm", "hetmm", AdviceKind::None, 1.0),
            with(row(&[1.0]), "gemm", "uvm", AdviceKind::None, 1.0),
        ];
        let lines = bars(&rows, &limits, 1 << 30);
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines.iter().all(|l| l.contains("[NOT met]") && l.contains("did not verify")), "{lines:#?}");
        assert!(advice_ratios(&rows).iter().all(Map::is_empty), "a ratio from a failed run");
    }
}
