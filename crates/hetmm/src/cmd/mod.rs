//! Subcommands.

pub mod bench;
mod bench_cuda;
pub mod demo;

use std::process::ExitCode;

use hetmm::sim::{SimConfig, SimDevice};
use hetmm::Hetmm;

/// Parses a size argument for clap.
pub fn size_arg(s: &str) -> Result<u64, String> {
    hetmm::parse_size(s).ok_or_else(|| format!("not a size: {s} (use e.g. 512M, 2G)"))
}

pub use hetmm::memory_total;

/// `hetmm info`.
pub fn info() -> Result<ExitCode, hetmm::Error> {
    let hm = Hetmm::new()?;
    let dev = hm.attach_sim(SimDevice::new(SimConfig::default())?)?;
    let caps = hm.space().device_caps(dev.id())?;
    println!(
        "userfaultfd: kernel-mode faults {}",
        if hm.kernel_faults_supported() { "served" } else { "NOT served (user-mode only)" }
    );
    println!(
        "device {:?}: {} ({} MiB, replayable faults: {}, coherent: {}, remote host access: {}, peer copies: {}, \
         mappings bound to regions: {})",
        dev.id(),
        caps.name,
        caps.memory_bytes >> 20,
        caps.replayable_faults,
        caps.coherent,
        caps.remote_host_access,
        caps.peer.map_or("none", |w| w.fabric),
        caps.region_bound
    );
    match dev.driver().config().access_counter_threshold {
        0 => println!("access counters: off"),
        n => println!("access counters: a 2 MiB region is reported at {n} remote 64-byte accesses"),
    }
    Ok(ExitCode::SUCCESS)
}
