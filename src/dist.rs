//! Processes of one run: rank and world size, and the collectives data parallelism needs.
//!
//! A run of `[parallel] data = D` is D processes started by `mpirun -np D` (or `srun`, or
//! `taproot launch`), each running the same deterministic scheduler (SPMD) over its share of
//! every step's micro-batches. MPI bootstraps and reduces (the `mpi` cargo feature, over the
//! MPI library the machine has); a one-process run never touches MPI, and a build without the
//! feature runs one process only.
//!
//! What crosses processes, all of it in the same order on every rank:
//! - each unit's gradients: a unit starts their all-reduce ([`all_reduce_start`]) as soon as its
//!   last backward of the step is done, before it hands its input gradient down, and waits for
//!   the sum only at the optimizer step. So the reduction of the upper layers runs while the
//!   lower ones are still in backward (DDP's bucket overlap, one bucket per layer), and the
//!   requests are made top layer first, then down the stack, then the embedding and head —
//!   the same order on every rank, since each is made before the next unit can finish;
//! - the step's loss sum ([`all_reduce_sum_f64`]), so every rank logs the same global loss.
//!
//! One thread of this module makes every MPI call, in the order the requests arrive (MPI is
//! initialised at `MPI_THREAD_SERIALIZED`); [`stats`] says how long it spent reducing and how
//! long the units waited for it, the part of the reduction that backward did not hide.
//!
//! Nothing else does: every rank holds the same weights after every step, evaluates the same
//! validation batches, and grows at the same step with the same layer ids and the same init;
//! rank 0 alone writes logs and checkpoints.

use anyhow::{bail, Result};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

static RANK: AtomicUsize = AtomicUsize::new(0);
static SIZE: AtomicUsize = AtomicUsize::new(1);
static REDUCE_NS: AtomicU64 = AtomicU64::new(0);
static WAIT_NS: AtomicU64 = AtomicU64::new(0);
static REDUCED_BYTES: AtomicU64 = AtomicU64::new(0);
static REDUCTIONS: AtomicU64 = AtomicU64::new(0);

/// What the collectives cost so far in this process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Seconds the communication thread spent inside all-reduce calls.
    pub reduce_s: f64,
    /// Seconds the units spent waiting for a sum (the part backward did not hide).
    pub wait_s: f64,
    pub bytes: u64,
    pub reductions: u64,
}

pub fn stats() -> Stats {
    Stats {
        reduce_s: REDUCE_NS.load(Ordering::Relaxed) as f64 * 1e-9,
        wait_s: WAIT_NS.load(Ordering::Relaxed) as f64 * 1e-9,
        bytes: REDUCED_BYTES.load(Ordering::Relaxed),
        reductions: REDUCTIONS.load(Ordering::Relaxed),
    }
}

fn add_ns(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// A request to the communication thread.
enum Job {
    F32(Vec<f32>, mpsc::Sender<Vec<f32>>),
    F64(Vec<f64>, mpsc::Sender<Vec<f64>>),
}

/// An all-reduce under way; [`Pending::wait`] gives the sum.
pub struct Pending(mpsc::Receiver<Vec<f32>>);

impl Pending {
    /// The sum over every rank (blocks until the communication thread has it).
    pub fn wait(self) -> Vec<f32> {
        let t0 = Instant::now();
        let v = self.0.recv().expect("the communication thread ended during a run");
        add_ns(&WAIT_NS, t0);
        v
    }
}

static JOBS: std::sync::Mutex<Option<mpsc::Sender<Job>>> = std::sync::Mutex::new(None);

fn submit(job: Job) {
    JOBS.lock()
        .expect("jobs lock")
        .as_ref()
        .expect("MPI is running when the world has several processes")
        .send(job)
        .expect("the communication thread is alive");
}

/// Start summing `buf` over every rank; the sum comes from [`Pending::wait`]. Every rank must
/// start the same reductions in the same order. In a one-process run the sum is `buf`.
pub fn all_reduce_start(buf: Vec<f32>) -> Pending {
    let (tx, rx) = mpsc::channel();
    if size() > 1 {
        submit(Job::F32(buf, tx));
    } else {
        tx.send(buf).expect("the receiver is here");
    }
    Pending(rx)
}

/// The thread that makes every MPI call, one request at a time, in arrival order. The sums are
/// written into the request's own buffer; the send side is a copy in a buffer of this thread,
/// reused, so a steady run allocates nothing here.
fn serve(jobs: mpsc::Receiver<Job>) {
    let (mut send32, mut send64) = (Vec::new(), Vec::new());
    for job in jobs {
        match job {
            Job::F32(mut v, reply) => {
                reduce(&mut v, &mut send32, imp::all_reduce_f32);
                let _ = reply.send(v);
            }
            Job::F64(mut v, reply) => {
                reduce(&mut v, &mut send64, imp::all_reduce_f64);
                let _ = reply.send(v);
            }
        }
    }
}

/// `v` summed over every rank by `all_reduce(send, recv)`, with `send` as the send buffer; counted
/// in [`stats`].
fn reduce<T: Copy>(v: &mut [T], send: &mut Vec<T>, all_reduce: fn(&[T], &mut [T])) {
    let t0 = Instant::now();
    send.clear();
    send.extend_from_slice(v);
    all_reduce(send, v);
    REDUCED_BYTES.fetch_add(std::mem::size_of_val(v) as u64, Ordering::Relaxed);
    add_ns(&REDUCE_NS, t0);
    REDUCTIONS.fetch_add(1, Ordering::Relaxed);
}

/// This process's rank (0 in a one-process run).
pub fn rank() -> usize {
    RANK.load(Ordering::Relaxed)
}

/// The number of processes of the run (1 in a one-process run).
pub fn size() -> usize {
    SIZE.load(Ordering::Relaxed)
}

/// Whether this process was started by an MPI launcher (mpirun, srun with PMI/PMIx).
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some())
}

/// The rank of this process among those of its host (`cuda:LOCAL_RANK` placement, metrics
/// ports), from the launcher's environment; 0 when it says nothing.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// The devices of this process's replica: `cuda:N` in `[placement]` becomes
/// `cuda:(N + local_rank × k)`, k the number of devices listed, so that the replicas on one host
/// take consecutive, disjoint groups of its GPUs (a one-GPU config runs on `cuda:LOCAL_RANK`).
/// CPU devices are logical and stay as they are.
pub fn replica_devices(devices: &[String], local_rank: usize) -> Vec<String> {
    devices.iter().map(|d| replica_device(d, local_rank, devices.len())).collect()
}

/// One device of [`replica_devices`], for a replica of `k` devices.
pub fn replica_device(device: &str, local_rank: usize, k: usize) -> String {
    match device.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => format!("cuda:{}", n + local_rank * k),
        None => device.to_string(),
    }
}

/// Start MPI when this process was launched by an MPI launcher or the config asks for more than
/// one data-parallel replica; then check that the world has `data` processes.
pub fn init(data: usize) -> Result<()> {
    // One replica in a build without MPI runs as it would anywhere, launcher or not.
    if data <= 1 && (!launched_by_mpi() || !cfg!(feature = "mpi")) {
        return Ok(());
    }
    imp::init()?;
    if size() > 1 {
        let (tx, rx) = mpsc::channel();
        *JOBS.lock().expect("jobs lock") = Some(tx);
        std::thread::Builder::new().name("taproot-mpi".into()).spawn(move || serve(rx))?;
    }
    if size() != data {
        let n = size();
        bail!(
            "`parallel.data` = {data}, but this run has {n} process{}: start it with `mpirun -np {data}` (or `taproot launch --config FILE`)",
            if n == 1 { "" } else { "es" }
        );
    }
    Ok(())
}

/// The command line that starts every process of `cfg`'s run: `mpirun -np N [--host
/// h1:n1,…] taproot train --config F [--set …]`, or under Slurm (`slurm`) the `srun` line to run
/// inside the allocation. N = `parallel.data × parallel.pipeline`; on several hosts each runs
/// `parallel.processes_per_host` (default: N / hosts, rounded up).
pub fn launch_line(
    cfg: &crate::config::Config,
    exe: &std::path::Path,
    config: &std::path::Path,
    sets: &[String],
    resume: bool,
    slurm: bool,
) -> Vec<String> {
    let p = &cfg.parallel;
    let n = p.data * p.pipeline;
    let per_host = p.processes_per_host.unwrap_or_else(|| n.div_ceil(p.hosts.len().max(1)));
    let mut line: Vec<String> = if slurm {
        let mut l = vec!["srun".to_string(), format!("--ntasks={n}")];
        if p.processes_per_host.is_some() || !p.hosts.is_empty() {
            l.push(format!("--ntasks-per-node={per_host}"));
        }
        l
    } else {
        let mut l = vec!["mpirun".to_string(), "-np".to_string(), n.to_string()];
        if !p.hosts.is_empty() {
            l.push("--host".into());
            l.push(p.hosts.iter().map(|h| format!("{h}:{per_host}")).collect::<Vec<_>>().join(","));
        }
        l
    };
    line.push(exe.display().to_string());
    line.push("train".into());
    line.push("--config".into());
    line.push(config.display().to_string());
    for s in sets {
        line.push("--set".into());
        line.push(s.clone());
    }
    if resume {
        line.push("--resume".into());
    }
    line
}

/// `x` summed over every rank, in place (a no-op in a one-process run).
pub fn all_reduce_sum_f64(x: &mut [f64]) {
    if size() > 1 {
        let (tx, rx) = mpsc::channel();
        submit(Job::F64(x.to_vec(), tx));
        x.copy_from_slice(&rx.recv().expect("the communication thread ended during a run"));
    }
}

/// End MPI (after the run, on every rank): the communication thread's queue closes, then MPI
/// finalises. A no-op when it was never started.
pub fn finalize() {
    drop(JOBS.lock().expect("jobs lock").take());
    imp::finalize();
}

/// Stop every process of the run (a failed rank must not leave the others waiting in a
/// collective). Does not return when MPI is running.
pub fn abort(code: i32) {
    if size() > 1 {
        imp::abort(code);
    }
}

#[cfg(feature = "mpi")]
mod imp {
    use super::{RANK, SIZE};
    use anyhow::{bail, Result};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

    fn world() -> SimpleCommunicator {
        SimpleCommunicator::world()
    }

    pub fn init() -> Result<()> {
        let mut u = UNIVERSE.lock().expect("MPI universe lock");
        if u.is_some() {
            return Ok(());
        }
        let Some((universe, threading)) = mpi::initialize_with_threading(mpi::Threading::Serialized) else {
            bail!("MPI was initialised twice in this process");
        };
        if threading < mpi::Threading::Serialized {
            bail!("the MPI library provides thread support {threading:?}; taproot needs at least Serialized");
        }
        let w = universe.world();
        RANK.store(w.rank() as usize, Ordering::Relaxed);
        SIZE.store(w.size() as usize, Ordering::Relaxed);
        *u = Some(universe);
        Ok(())
    }

    pub fn all_reduce_f32(send: &[f32], recv: &mut [f32]) {
        world().all_reduce_into(send, recv, SystemOperation::sum());
    }

    pub fn all_reduce_f64(send: &[f64], recv: &mut [f64]) {
        world().all_reduce_into(send, recv, SystemOperation::sum());
    }

    pub fn finalize() {
        // Dropping the universe calls MPI_Finalize.
        drop(UNIVERSE.lock().expect("MPI universe lock").take());
    }

    pub fn abort(code: i32) {
        world().abort(code);
    }
}

#[cfg(not(feature = "mpi"))]
mod imp {
    use anyhow::{bail, Result};

    pub fn init() -> Result<()> {
        bail!("this run asks for several processes (`parallel.data` > 1, or an MPI launcher started it), but taproot was built without MPI: rebuild with `cargo build --release --features mpi`")
    }
    pub fn all_reduce_f32(_: &[f32], _: &mut [f32]) {
        unreachable!("the world has one process without the `mpi` feature")
    }
    pub fn all_reduce_f64(_: &[f64], _: &mut [f64]) {
        unreachable!("the world has one process without the `mpi` feature")
    }
    pub fn finalize() {}
    pub fn abort(_: i32) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_on_one_host_take_disjoint_gpu_groups() {
        let two = ["cuda:0".to_string(), "cuda:1".to_string()];
        assert_eq!(replica_devices(&two, 0), two);
        assert_eq!(replica_devices(&two, 1), ["cuda:2", "cuda:3"]);
        assert_eq!(replica_devices(&["cuda:0".to_string()], 3), ["cuda:3"]);
        assert_eq!(replica_device("cuda:1", 1, 2), "cuda:3");
        assert_eq!(replica_devices(&["cpu:0".to_string(), "cpu:1".to_string()], 1), ["cpu:0", "cpu:1"]);
    }

    #[test]
    fn one_process_reduces_to_itself() {
        assert_eq!(size(), 1);
        assert_eq!(all_reduce_start(vec![1.5, -2.0]).wait(), vec![1.5, -2.0]);
        let mut x = [3.0f64];
        all_reduce_sum_f64(&mut x);
        assert_eq!(x, [3.0]);
    }
}
