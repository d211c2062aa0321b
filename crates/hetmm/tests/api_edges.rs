//! The public API's edges: ranges at the top of the address space, and calls that name memory
//! the caller does not own in the way the call needs. Each gets a typed error; nothing panics
//! and no buffer is harmed.

use std::time::Duration;

use hetmm::core::error::CoreError;
use hetmm::kernels::stream_write;
use hetmm::sim::{BlockCtx, Grid, SimConfig, SimDevice};
use hetmm::{Access, Device, Error, Hetmm, Use};

fn setup(mem: u64) -> (Hetmm, Device<SimDevice>) {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Hetmm::new().expect("userfaultfd and memfd are available");
    let dev = hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: mem, ..SimConfig::default() }).unwrap()).unwrap();
    (hm, dev)
}

/// A use whose end fits in 64 bits but whose page-rounded end does not (rounding up to the next
/// page overflows): refused as an overflow, like one whose end itself overflows.
#[test]
fn a_use_ending_in_the_last_page_of_the_address_space_is_refused() {
    let (_hm, dev) = setup(8 << 20);
    let noop = |_: &BlockCtx| Ok(());
    let g = Grid { blocks: 1, threads_per_block: 1 };
    let r = dev.launch(g, &[Use::raw(u64::MAX - 100, 50, Access::Read)], noop);
    assert!(matches!(r, Err(Error::Core(CoreError::Overflow { .. }))), "{r:?}");
}
