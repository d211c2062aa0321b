//! Two simulated devices take turns updating one buffer (a producer and a consumer, as a
//! pipeline across two GPUs does): each turn's kernel reads and rewrites every word, so the data
//! moves from the other device every turn. Measured with the devices' peer windows (each turn's
//! data copied straight from the other device's memory) and without (copied home, then out),
//! alternately, in fresh address spaces; every word is checked at the end of each run. Prints
//! medians, beside memcpy of the same buffer and the kernel alone (one more turn on the same
//! device), measured in the same run. Then the same for an explicit `Prefetch` to the second
//! device of a buffer the first device's kernel wrote (so the CPU never held it).
//!
//! `cargo run --release --example peer_turns -- [SIZE] [TURNS] [REPEAT]` (default 256M 8 5).

use std::time::{Duration, Instant};

use hetmm::kernels::{stream_map, stream_write};
use hetmm::sim::{SimConfig, SimDevice};
use hetmm::{Advice, Hetmm, Use};

const MUL: u64 = 3;
const ADD: u64 = 1;

/// One run (its data checked): seconds of the turns after the first (the first brings the data
/// from the CPU), and the bytes those turns moved between devices, home, and out.
struct Run {
    seconds: f64,
    /// One more turn on the device that took the last: the kernel with its data resident.
    resident: f64,
    peer_bytes: u64,
    home_bytes: u64,
    out_bytes: u64,
}

fn main() -> Result<(), hetmm::Error> {
    let mut args = std::env::args().skip(1);
    let size = args.next().and_then(|s| hetmm::parse_size(&s)).unwrap_or(256 << 20);
    let turns: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(8).max(2);
    let repeat: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5).max(1);
    let n = (size / 8) as usize;
    let memcpy = memcpy_seconds(size as usize);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let (mut pf_with, mut pf_without) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        with.push(run(n, turns, true)?);
        without.push(run(n, turns, false)?);
        pf_with.push(prefetch(n, true)?);
        pf_without.push(prefetch(n, false)?);
    }
    println!("memcpy of {} MiB: {:.2} ms (median of 5)", size >> 20, memcpy * 1e3);
    for (name, runs) in [("peer copies", with), ("through host memory", without)] {
        let per_turn = median(runs.iter().map(|r| r.seconds / (turns - 1) as f64).collect());
        let resident = median(runs.iter().map(|r| r.resident).collect());
        let r = &runs[0];
        println!(
            "{name}: {:.2} ms per turn ({:.2}x memcpy of the buffer; the kernel alone, data resident, {:.2} ms), \
             per run: {} MiB device to device, {} MiB home, {} MiB out (medians of {repeat})",
            per_turn * 1e3,
            per_turn / memcpy,
            resident * 1e3,
            r.peer_bytes >> 20,
            r.home_bytes >> 20,
            r.out_bytes >> 20,
        );
    }
    for (name, v) in [("peer copies", pf_with), ("through host memory", pf_without)] {
        let s = median(v);
        println!("Prefetch to the second device, {name}: {:.2} ms ({:.2}x memcpy of the buffer)", s * 1e3, s / memcpy);
    }
    Ok(())
}

/// Two devices (with or without peer windows); the first one's kernel writes a fresh buffer; then
/// a bulk `Prefetch` to the second, timed. Returns its seconds, the data checked.
fn prefetch(n: usize, peer: bool) -> Result<f64, hetmm::Error> {
    let (hm, devs) = two_devices(n, peer)?;
    let buf = hm.alloc::<u64>(n)?;
    let (grid, k) = stream_write(buf.ptr(), n, 5);
    devs[0].launch(grid, &[Use::write(&buf)], k)?.wait()?;
    let t = Instant::now();
    hm.advise_buf(&buf, Advice::Prefetch(devs[1].proc()))?.wait(Duration::from_secs(60))?;
    let s = t.elapsed().as_secs_f64();
    if !buf.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ 5) {
        eprintln!("peer_turns: wrong data after the prefetch (peer copies {peer})");
        std::process::exit(1);
    }
    Ok(s)
}

/// An address space with two simulated devices of twice `n` words each.
fn two_devices(n: usize, peer: bool) -> Result<(Hetmm, [hetmm::Device<SimDevice>; 2]), hetmm::Error> {
    let hm = Hetmm::new()?;
    let cfg = SimConfig {
        memory_bytes: ((n as u64 * 8) * 2).div_ceil(2 << 20) * (2 << 20),
        prefault: true,
        peer_copies: peer,
        ..SimConfig::default()
    };
    let devs = [hm.attach_sim(SimDevice::new(cfg.clone())?)?, hm.attach_sim(SimDevice::new(cfg)?)?];
    Ok((hm, devs))
}

fn run(n: usize, turns: u64, peer: bool) -> Result<Run, hetmm::Error> {
    let (hm, devs) = two_devices(n, peer)?;
    let mut buf = hm.alloc::<u64>(n)?;
    for (i, v) in buf.as_mut_slice().iter_mut().enumerate() {
        *v = i as u64;
    }
    let turn = |t: u64| -> Result<(), hetmm::Error> {
        let (grid, k) = stream_map(buf.ptr(), buf.ptr(), n, MUL, ADD);
        devs[t as usize % 2].launch(grid, &[Use::write(&buf)], k)?.wait()
    };
    turn(0)?;
    let before = hm.stats();
    let t = Instant::now();
    for k in 1..turns {
        turn(k)?;
    }
    let seconds = t.elapsed().as_secs_f64();
    let st = hm.stats().since(&before);
    let t = Instant::now();
    turn(turns - 1)?;
    let resident = t.elapsed().as_secs_f64();
    let ok = buf
        .as_slice()
        .iter()
        .enumerate()
        .all(|(i, v)| *v == (0..=turns).fold(i as u64, |x, _| x.wrapping_mul(MUL).wrapping_add(ADD)));
    if !ok {
        eprintln!("peer_turns: wrong data (peer copies {peer})");
        std::process::exit(1);
    }
    Ok(Run {
        seconds,
        resident,
        peer_bytes: st.bytes_device_to_device,
        home_bytes: st.bytes_to_host,
        out_bytes: st.bytes_to_device,
    })
}

fn memcpy_seconds(len: usize) -> f64 {
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    let v = (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(v)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
