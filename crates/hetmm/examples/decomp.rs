use hetmm::kernels::stream_map;
use hetmm::sim::{SimConfig, SimDevice};
use hetmm::{Advice, Hetmm, Use};
use std::time::Instant;

fn main() {
    let size: u64 = std::env::args().nth(1).map(|s| hetmm::parse_size(&s).unwrap()).unwrap_or(2 << 30);
    let policy = std::env::args().nth(2).unwrap_or("hetmm".into());
    let modes: Vec<String> =
        std::env::args().nth(3).unwrap_or("fault,prefetch,fault".into()).split(',').map(String::from).collect();
    let n = (size / 16) as usize;
    for mode in modes {
        let hm = Hetmm::with_policy(&policy).unwrap();
        let dev = hm
            .attach_sim(
                SimDevice::new(SimConfig { memory_bytes: size * 2, prefault: true, ..SimConfig::default() }).unwrap(),
            )
            .unwrap();
        let mut a = hm.alloc::<u64>(n).unwrap();
        let mut b = hm.alloc::<u64>(n).unwrap();
        for (i, v) in a.as_mut_slice().iter_mut().enumerate() {
            *v = i as u64;
        }
        b.as_mut_slice().fill(7);
        let s0 = hm.stats();
        let t = Instant::now();
        if mode == "prefetch" {
            let p1 = hm.advise_buf(&a, Advice::Prefetch(dev.proc())).unwrap();
            let p2 = hm.advise_buf(&b, Advice::Prefetch(dev.proc())).unwrap();
            p1.wait(std::time::Duration::from_secs(60)).unwrap();
            p2.wait(std::time::Duration::from_secs(60)).unwrap();
        }
        let tp = t.elapsed().as_secs_f64();
        let (grid, k) = stream_map(a.ptr(), b.ptr(), n, 3, 1);
        dev.launch(grid, &[Use::read(&a), Use::write(&b)], k).unwrap().wait().unwrap();
        let t1 = t.elapsed().as_secs_f64();
        let st = hm.stats().since(&s0);
        let (grid, k) = stream_map(a.ptr(), b.ptr(), n, 3, 1);
        let t2 = Instant::now();
        dev.launch(grid, &[Use::read(&a), Use::write(&b)], k).unwrap().wait().unwrap();
        let t3 = t2.elapsed().as_secs_f64();
        println!("{mode}: prefetch {tp:.3} first-launch-total {t1:.3} resident-launch {t3:.3} revoke {:.3} copy {:.3} alloc {:.3} map {:.3} faults {} batches {} blocks {} prefetched {}",
            st.ns_revoke as f64 * 1e-9, st.ns_copy as f64 * 1e-9, st.ns_alloc as f64 * 1e-9, st.ns_map as f64 * 1e-9, st.device_faults, st.fault_batches, st.blocks_serviced, st.prefetched_pages);
    }
}
