//! `taproot check-collectives --config F`: the collectives of a multi-process config, checked
//! before a long run is started on them. Started like the run (`mpirun -np N`, `srun`, or
//! `taproot launch --check`), every process opens its device as the run would, fills a buffer
//! with values of its own, sums it over its stage's replicas by `parallel.collectives` (the
//! host path: download, MPI, upload; or NCCL on the device), checks every element of the sum
//! and times the sum. Each process prints a line; rank 0 prints the verdict. With NCCL, each
//! process also prints a digest of the communicator's id, the same on every replica of a stage
//! when MPI handed it over intact.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::Backend;
use crate::config::{Collectives, Config};
use anyhow::{bail, Result};
use std::time::Instant;

/// Floats summed per process: 64 MiB on a GPU, 4 MiB on the CPU.
fn floats(on_cuda: bool) -> usize {
    if on_cuda {
        16 << 20
    } else {
        1 << 20
    }
}

const TIMED: usize = 5;

pub fn check_collectives(mut cfg: Config) -> Result<()> {
    super::set_timeout(cfg.parallel.timeout_s);
    super::set_collectives(cfg.parallel.collectives)?;
    let facts = || super::Facts::of_run(&cfg, &[("command", "check-collectives".into())]);
    let topo = super::init(cfg.parallel.data, cfg.parallel.pipeline, facts)?;
    super::map_devices(&mut cfg);
    let device = cfg.placement.ends.clone().unwrap_or_else(|| cfg.placement.devices[0].clone());
    let who = format!("rank {} (stage {}, replica {} of {}) on {device}", topo.rank(), topo.stage, topo.replica, topo.replicas);
    let how = cfg.parallel.collectives;
    // Every process reaches the verdict, failed or not, so that each one's line is printed.
    let result = (|| -> Result<String> {
        #[cfg(feature = "nccl")]
        if how == Collectives::Nccl {
            let (major, minor, patch) = super::nccl::version()?;
            let id = super::nccl::replica_id()?;
            let digest = id.bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            println!("{who}: NCCL {major}.{minor}.{patch}, communicator id {digest:016x}");
        }
        if cfg.on_cuda() {
            sum_on(&CudaBackend::open(&device)?, how, topo.replica, topo.replicas, floats(true))
        } else {
            sum_on(&CpuBackend::default(), how, topo.replica, topo.replicas, floats(false))
        }
    })();
    match &result {
        Ok(line) => println!("{who}: {line}"),
        Err(e) => println!("{who}: FAILED: {e:#}"),
    }
    let mut failed = [result.is_err() as u64];
    // Over the replicas of this stage; the stages' verdicts are each their own.
    super::all_max_u64(&mut failed);
    if topo.rank() == 0 {
        let what = match how {
            Collectives::Host => "host collectives (MPI)",
            Collectives::Nccl => "NCCL",
        };
        match failed[0] {
            0 => println!("collectives check passed: {} process(es), {what}", topo.size()),
            _ => println!("collectives check FAILED: {what} (the lines above say where)"),
        }
    }
    if failed[0] != 0 {
        match result {
            Err(e) => return Err(e),
            Ok(_) => bail!("another replica of this stage failed its collectives check"),
        }
    }
    Ok(())
}

/// Sum `n` floats over the replicas on `be` by `how`, check every element and time the sum:
/// the line to print.
fn sum_on<B: Backend>(be: &B, how: Collectives, replica: usize, replicas: usize, n: usize) -> Result<String> {
    let mine: Vec<f32> = (0..n).map(|i| (replica + 1) as f32 + (i % 7) as f32).collect();
    let want = |i: usize| (replicas * (replicas + 1) / 2) as f32 + (replicas * (i % 7)) as f32;
    let buf = be.alloc(n);
    let mut host = vec![0.0f32; n];
    let mut times = Vec::new();
    for rep in 0..=TIMED {
        be.upload(B::whole(&buf), &mine);
        be.synchronize();
        let t0 = Instant::now();
        match how {
            Collectives::Host => {
                be.download(B::whole(&buf), &mut host);
                let sum = super::all_reduce_start(std::mem::take(&mut host)).wait();
                be.upload(B::whole(&buf), &sum);
                host = sum;
            }
            Collectives::Nccl => {
                let Some(v) = be.device_view(B::whole(&buf)) else {
                    bail!("`parallel.collectives` = \"nccl\" needs a CUDA device");
                };
                super::all_reduce_in_place(v)?;
            }
        }
        be.synchronize();
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
        be.download(B::whole(&buf), &mut host);
        if let Some(i) = (0..n).find(|&i| host[i] != want(i)) {
            bail!("element {i} of the sum is {} where {} was due (pass {rep})", host[i], want(i));
        }
    }
    times.sort_by(f64::total_cmp);
    let t = times[times.len() / 2];
    let bytes = (4 * n) as f64;
    // NCCL's bus bandwidth: what each link carries in a ring all-reduce.
    let bus = bytes / t * 2.0 * (replicas - 1) as f64 / replicas as f64;
    Ok(format!(
        "sum of {:.0} MiB over {replicas} replica(s) correct; {:.2} ms median of {TIMED}, {:.2} GB/s algorithm, {:.2} GB/s bus bandwidth",
        bytes / (1 << 20) as f64,
        t * 1e3,
        bytes / t / 1e9,
        bus / 1e9
    ))
}
