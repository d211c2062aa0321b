//! `hetmm bench` end to end at a tiny size: every workload runs, verifies its result, and
//! prints one JSON object per run with the fields the issue asks for; the SVG is well formed;
//! bad options get clear errors.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hetmm")).arg("bench").args(args).output().expect("the hetmm binary runs")
}

const WORKLOADS: [&str; 8] = ["stream", "random", "gemm", "stencil", "graph", "pingpong", "readmostly", "faultback"];

#[test]
fn every_workload_runs_verifies_and_reports_json() {
    let dir = std::env::temp_dir().join(format!("hetmm-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("bench.svg");
    let out = bench(&["--size", "8M", "--repeat", "1", "--oversub", "0.5,2", "--json", "--svg", svg.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hetmm bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    // Rows can verify while hetmm logged a fault it could not serve: no error may be logged.
    assert!(!stderr.contains(" ERROR "), "hetmm logged errors:\n{stderr}");

    let rows: Vec<Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for r in &rows {
        for key in [
            "workload",
            "device",
            "policy",
            "oversub",
            "bytes",
            "seconds",
            "gbps",
            "limit_gbps",
            "ratio_to_limit",
            "stats",
        ] {
            assert!(r.get(key).is_some(), "missing {key} in {r}");
        }
        for key in [
            "cpu_faults",
            "device_faults",
            "fault_batches",
            "bytes_to_device",
            "bytes_to_host",
            "evictions",
            "prefetched_bytes",
            "thrash_events",
        ] {
            assert!(r["stats"][key].is_u64(), "missing stats.{key} in {r}");
        }
        assert_eq!(r["verified"], Value::Bool(true), "not verified: {r}");
        assert_eq!(r["device"], "sim");
        assert!(r["seconds"].as_f64().is_some_and(|s| s > 0.0), "seconds in {r}");
        assert!(r["limit_gbps"].as_f64().is_some_and(|s| s > 0.0), "limit in {r}");
    }
    // Every workload, both default policies, both oversubscriptions (faultback: 0.5 only).
    for w in WORKLOADS {
        for p in ["hetmm", "uvm"] {
            let oversubs: &[f64] = if w == "faultback" { &[0.5] } else { &[0.5, 2.0] };
            for &o in oversubs {
                assert!(
                    rows.iter().any(|r| r["workload"] == w && r["policy"] == p && r["oversub"].as_f64() == Some(o)),
                    "no row for {w} {p} x{o}"
                );
            }
        }
    }
    // The stream's second row (CPU re-read) and both advice variants of the read-sharing ones.
    assert!(rows.iter().any(|r| r["workload"] == "stream" && r["variant"] == "cpu-reread"));
    for w in ["pingpong", "readmostly"] {
        for a in ["none", "read_mostly"] {
            assert!(rows.iter().any(|r| r["workload"] == w && r["advice"] == a), "no {w} row with advice {a}");
        }
        assert!(rows.iter().any(|r| r["workload"] == w && r["migration_reduction"].is_f64()));
    }

    let text = std::fs::read_to_string(&svg).expect("the SVG was written");
    let t = text.trim();
    assert!(t.starts_with("<svg") || t.starts_with("<?xml"), "SVG header: {}", &t[..t.len().min(80)]);
    assert!(t.ends_with("</svg>"), "SVG is closed");
    for w in ["stream", "gemm", "pingpong"] {
        assert!(text.contains(w), "the chart names {w}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_options_get_clear_errors() {
    let out = bench(&["--device", "tpu", "--workload", "stream", "--size", "4M"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tpu") && err.contains("sim") && err.contains("cuda"), "{err}");

    // Without a GPU the CUDA section refuses with the reason; with one it would run.
    if hetmm::cuda::probe().is_err() {
        let out = bench(&["--device", "cuda", "--workload", "stream", "--size", "4M"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs an NVIDIA GPU"));
    }

    let out = bench(&["--workload", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown workload"));

    let out = bench(&["--policy", "lru"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown policy"));

    let out = bench(&["--oversub", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--oversub"));
}

/// A working set or a device memory (working set / oversub) larger than the machine is refused
/// before anything is allocated: `--size` near 2^64 overflowed computing the device memory (a
/// panic), and sizes merely larger than memory, or a tiny `--oversub`, had the process killed
/// by the OOM killer while it prefaulted the simulated device's memory.
#[test]
fn sizes_beyond_this_machine_are_refused() {
    for args in [
        &["--workload", "stream", "--repeat", "1", "--size", "18446744073709551615"][..],
        &["--workload", "stream", "--repeat", "1", "--size", "16T", "--oversub", "1"],
        &["--workload", "stream", "--repeat", "1", "--size", "1M", "--oversub", "0.000001"],
    ] {
        let out = bench(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}\nstderr:\n{err}", out.status);
        assert!(err.contains("memory"), "{args:?}: {err}");
    }
}

/// `hetmm demo` with sizes beyond this machine gets an error, not a crash: a `--device-mem`
/// near 2^64 overflowed rounding it up to 2 MiB (a panic), and matrices larger than memory got
/// the process OOM-killed.
#[test]
fn demo_refuses_sizes_beyond_this_machine() {
    for args in [&["--m", "4", "--device-mem", "18446744073709551615"][..], &["--m", "100000"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_hetmm")).arg("demo").args(args).output().expect("hetmm runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}\nstderr:\n{err}", out.status);
        assert!(err.contains("memory"), "{args:?}: {err}");
    }
}

/// A workload or oversubscription named twice runs once: `stream,random,stream` ran stream's
/// job twice and merged both into one row (two "repeats" for `--repeat 1`), and so did two
/// factors that round to the same row (`1,1.0004`).
#[test]
fn names_given_twice_run_once() {
    let out = bench(&[
        "--workload",
        "stream,random,stream",
        "--policy",
        "hetmm",
        "--oversub",
        "1,1.0004",
        "--size",
        "1M",
        "--repeat",
        "1",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3, "stream, stream/cpu-reread and random at one oversub:\n{stdout}");
    for r in &rows {
        assert_eq!(r["repeats"], 1, "{r}");
    }
}

/// A device is whole 2 MiB blocks: 1 MiB at `--oversub 64` runs on a 2 MiB device, not
/// oversubscribed at all. The stream bar for oversubscription 1.5 and more was judged on it
/// anyway ("[met] stream x64: hetmm 2.29x faster than uvm (bar 2x)").
#[test]
fn bars_judge_the_oversubscription_runs_had() {
    let out = bench(&["--workload", "stream", "--oversub", "64", "--size", "1M", "--repeat", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("(bar 2x)"), "a 2 MiB device holding 1 MiB is judged as oversubscribed:\n{stdout}");
    let json = bench(&[
        "--workload",
        "stream",
        "--policy",
        "hetmm",
        "--oversub",
        "64",
        "--size",
        "1M",
        "--repeat",
        "1",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&json.stdout);
    let row: Value = serde_json::from_str(stdout.lines().next().unwrap_or_default()).unwrap();
    assert_eq!(row["effective_oversub"], 0.5, "{row}");
}
