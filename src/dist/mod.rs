//! Processes of one run: rank and world size, the collectives data parallelism needs, and the
//! point-to-point frames of a pipeline split across processes.
//!
//! A run of `[parallel] data = D, pipeline = P` is D·P processes started by `mpirun -np D·P`
//! (or `srun`, or `taproot launch`). Rank r is stage `r mod P` of replica `r div P`: the P
//! stages of one replica are consecutive ranks (so `--host h:n` packs a pipeline onto one
//! host, where its hand-offs are cheapest), and the D replicas of one stage form that stage's
//! *replica communicator*, over which its gradients are summed. Stage 0 of each replica runs
//! the scheduler, the embedding and the head, and the layers placed on it; stages 1..P host
//! the layers placed on them (`runtime::remote`). The D schedulers run the same deterministic
//! step loop (SPMD) over their shares of every step's micro-batches. MPI bootstraps, reduces
//! and carries the frames (the `mpi` cargo feature, over the MPI library the machine has); a
//! one-process run never touches MPI, and a build without the feature runs one process only.
//!
//! Frames between the stages of one replica ([`send_frame`], [`take_incoming`]) go over the
//! replica's *pipeline communicator* as non-blocking sends (in parts of at most 1 GiB, since MPI
//! counts are 32-bit); the communication thread polls for
//! incoming ones between requests, so a send never waits for its receiver to be ready and a
//! collective in progress never stops a frame (no cycle of blocked calls across replicas).
//!
//! What the replicas exchange, all of it in the same order on every rank of a stage:
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
//! Nothing else does: every replica holds the same weights after every step, evaluates the
//! same validation batches, and grows at the same step with the same layer ids and the same
//! init (checked after every growth with [`all_max_u64`]); rank 0 alone writes logs and
//! checkpoints.

pub mod agree;
pub mod check;
pub use agree::Facts;
mod device;
pub use device::{all_reduce_in_place, on_device, set_collective_stall, set_collectives};
mod placement;
pub use placement::{map_devices, replica_device, replica_devices};
mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod nccl_watch;
pub mod topology;
pub mod watchdog;
pub use launch::{launch_command, launch_line, shell_line, shell_word};
pub use topology::Topology;

use anyhow::{bail, Result};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

static RANK: AtomicUsize = AtomicUsize::new(0);
static SIZE: AtomicUsize = AtomicUsize::new(1);
/// Pipeline stages per replica (P) and this process's stage.
static STAGES: AtomicUsize = AtomicUsize::new(1);
static STAGE: AtomicUsize = AtomicUsize::new(0);
/// `parallel.timeout_s` (0: wait forever), read by the communication thread at each collective.
static TIMEOUT_S: AtomicU64 = AtomicU64::new(0);
static FRAMES_SENT: AtomicU64 = AtomicU64::new(0);
static FRAME_BYTES_SENT: AtomicU64 = AtomicU64::new(0);
static FRAME_BYTES_RECEIVED: AtomicU64 = AtomicU64::new(0);
/// Frame bytes sent to and received from each stage of this replica (a link per pair).
static LINK_SENT: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());
static LINK_RECEIVED: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

fn count_link(table: &std::sync::Mutex<Vec<u64>>, stage: usize, bytes: usize) {
    let mut t = table.lock().expect("link counters lock");
    if t.len() <= stage {
        t.resize(stage + 1, 0);
    }
    t[stage] += bytes as u64;
}

/// Frame bytes this process sent to each other stage of its replica, and received from each:
/// (stage, sent, received), for every stage it exchanged frames with.
pub fn link_bytes() -> Vec<(usize, u64, u64)> {
    let (s, r) = (LINK_SENT.lock().expect("link counters lock").clone(), LINK_RECEIVED.lock().expect("link counters lock").clone());
    (0..s.len().max(r.len()))
        .filter(|&q| q != stage())
        .map(|q| (q, s.get(q).copied().unwrap_or(0), r.get(q).copied().unwrap_or(0)))
        .filter(|&(_, a, b)| a + b > 0)
        .collect()
}
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
    /// Pipeline frames sent, and their bytes sent and received.
    pub frames_sent: u64,
    pub frame_bytes_sent: u64,
    pub frame_bytes_received: u64,
}

pub fn stats() -> Stats {
    Stats {
        reduce_s: REDUCE_NS.load(Ordering::Relaxed) as f64 * 1e-9,
        wait_s: WAIT_NS.load(Ordering::Relaxed) as f64 * 1e-9,
        bytes: REDUCED_BYTES.load(Ordering::Relaxed),
        reductions: REDUCTIONS.load(Ordering::Relaxed),
        frames_sent: FRAMES_SENT.load(Ordering::Relaxed),
        frame_bytes_sent: FRAME_BYTES_SENT.load(Ordering::Relaxed),
        frame_bytes_received: FRAME_BYTES_RECEIVED.load(Ordering::Relaxed),
    }
}

fn add_ns(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// A request to the communication thread.
enum Job {
    F32(Vec<f32>, mpsc::Sender<Vec<f32>>),
    F64(Vec<f64>, mpsc::Sender<Vec<f64>>),
    MaxU64(Vec<u64>, mpsc::Sender<Vec<u64>>),
    /// A frame for stage `to` of this replica.
    Send {
        to: usize,
        bytes: Vec<u8>,
    },
}

/// An all-reduce under way; [`Pending::wait`] gives the sum.
pub struct Pending(mpsc::Receiver<Vec<f32>>);

impl Pending {
    /// The sum over every rank (blocks until the communication thread has it).
    pub fn wait(self) -> Vec<f32> {
        let t0 = Instant::now();
        let v = self.0.recv().expect("the communication thread ended during a run");
        add_ns(&WAIT_NS, t0);
        ::metrics::histogram!("taproot_allreduce_wait_seconds").record(t0.elapsed().as_secs_f64());
        v
    }
}

static JOBS: std::sync::Mutex<Option<mpsc::Sender<Job>>> = std::sync::Mutex::new(None);
static THREAD: std::sync::Mutex<Option<std::thread::JoinHandle<()>>> = std::sync::Mutex::new(None);
/// Frames from the other stages of this replica: (sending stage, bytes), until taken.
static INCOMING: std::sync::Mutex<Option<mpsc::Receiver<Frame>>> = std::sync::Mutex::new(None);

/// A frame from another stage of this replica: (its stage, its bytes).
pub type Frame = (usize, Vec<u8>);

fn submit(job: Job) {
    JOBS.lock()
        .expect("jobs lock")
        .as_ref()
        .expect("MPI is running when the world has several processes")
        .send(job)
        .expect("the communication thread is alive");
}

/// Start summing `buf` over the replicas of this stage; the sum comes from [`Pending::wait`].
/// Every replica must start the same reductions in the same order. With one replica the sum is
/// `buf`.
pub fn all_reduce_start(buf: Vec<f32>) -> Pending {
    let (tx, rx) = mpsc::channel();
    if replicas() > 1 {
        submit(Job::F32(buf, tx));
    } else {
        tx.send(buf).expect("the receiver is here");
    }
    Pending(rx)
}

/// The thread that makes every MPI call, one request at a time, in arrival order. The sums are
/// written into the request's own buffer; the send side is a copy in a buffer of this thread,
/// reused, so a steady run allocates nothing here. With several pipeline stages it also polls
/// for incoming frames between requests and keeps the non-blocking
/// sends it started until they complete; it waits for all of them before it ends.
fn serve(jobs: mpsc::Receiver<Job>, ready: mpsc::Sender<Result<(), String>>, incoming: mpsc::Sender<Frame>) {
    let comms = match imp::Comms::new(stage(), replica()) {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return;
        }
    };
    let polling = stages() > 1;
    let (mut send32, mut send64, mut sendu64) = (Vec::new(), Vec::new(), Vec::new());
    let mut sends: Vec<imp::SendRequest> = Vec::new();
    let mut joiner = Joiner::default();
    // Polling backs off while nothing happens (20 µs doubling to 1 ms), so an idle stage does
    // not take a core from the compute threads, and snaps back at the next frame or request.
    let mut idle = 0u32;
    loop {
        let job = if polling {
            let wait = std::time::Duration::from_micros((20u64 << idle.min(6)).min(1000));
            match jobs.recv_timeout(wait) {
                Ok(j) => Some(j),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match jobs.recv() {
                Ok(j) => Some(j),
                Err(_) => break,
            }
        };
        let had_job = job.is_some();
        match job {
            Some(Job::F32(mut v, reply)) => {
                reduce(&mut v, &mut send32, |s, r| comms.all_reduce_f32(s, r));
                let _ = reply.send(v);
            }
            Some(Job::F64(mut v, reply)) => {
                reduce(&mut v, &mut send64, |s, r| comms.all_reduce_f64(s, r));
                let _ = reply.send(v);
            }
            Some(Job::MaxU64(mut v, reply)) => {
                sendu64.clear();
                sendu64.extend_from_slice(&v);
                comms.all_max_u64(&sendu64, &mut v);
                let _ = reply.send(v);
            }
            Some(Job::Send { to, bytes }) => {
                FRAMES_SENT.fetch_add(1, Ordering::Relaxed);
                FRAME_BYTES_SENT.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                count_link(&LINK_SENT, to, bytes.len());
                for part in split_frame(bytes, MAX_MESSAGE) {
                    sends.push(comms.send(to, part));
                }
            }
            None => {}
        }
        if polling {
            let busy = had_job || !sends.is_empty();
            sends.retain_mut(|r| !r.done());
            let mut received = false;
            while let Some((from, part)) = comms.receive() {
                received = true;
                watchdog::heard_from(from);
                if let Some(bytes) = joiner.push(from, part) {
                    FRAME_BYTES_RECEIVED.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    count_link(&LINK_RECEIVED, from, bytes.len());
                    let _ = incoming.send((from, bytes));
                }
            }
            idle = if busy || received { 0 } else { idle + 1 };
        }
    }
    // Every frame started must have left before MPI ends.
    while !sends.is_empty() {
        sends.retain_mut(|r| !r.done());
        while let Some((_, _)) = comms.receive() {}
        std::thread::yield_now();
    }
    comms.finish_beats();
}

/// The largest MPI message a frame part may be (MPI counts are 32-bit: a frame of a
/// multi-GB unit state is sent in parts).
const MAX_MESSAGE: usize = 1 << 30;

/// A frame as MPI messages of at most `max` payload bytes each, each followed by one byte: 1
/// when more parts follow, 0 for the last. A frame that fits in one message (every activation)
/// is sent as it is, with its byte appended: no copy.
fn split_frame(mut bytes: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
    if bytes.len() <= max {
        bytes.push(0);
        return vec![bytes];
    }
    let n = bytes.len().div_ceil(max);
    bytes
        .chunks(max)
        .enumerate()
        .map(|(i, part)| {
            let mut m = Vec::with_capacity(part.len() + 1);
            m.extend_from_slice(part);
            m.push(u8::from(i + 1 < n));
            m
        })
        .collect()
}

/// Reassembles frames from their parts, per sending stage (parts from one sender arrive in
/// order: MPI does not overtake between two processes on one communicator and tag).
#[derive(Default)]
struct Joiner {
    partial: std::collections::HashMap<usize, Vec<u8>>,
}

impl Joiner {
    /// Add a part from `from`; the whole frame once its last part is in (a one-part frame is
    /// the message itself, its last byte dropped).
    fn push(&mut self, from: usize, mut part: Vec<u8>) -> Option<Vec<u8>> {
        let more = part.pop()?;
        match (more, self.partial.remove(&from)) {
            (0, None) => Some(part),
            (0, Some(mut buf)) => {
                buf.extend_from_slice(&part);
                Some(buf)
            }
            (_, Some(mut buf)) => {
                buf.extend_from_slice(&part);
                self.partial.insert(from, buf);
                None
            }
            (_, None) => {
                self.partial.insert(from, part);
                None
            }
        }
    }
}

/// `v` summed over every rank by `all_reduce(send, recv)`, with `send` as the send buffer; counted
/// in [`stats`].
fn reduce<T: Copy>(v: &mut [T], send: &mut Vec<T>, all_reduce: impl Fn(&[T], &mut [T])) {
    let t0 = Instant::now();
    send.clear();
    send.extend_from_slice(v);
    all_reduce(send, v);
    REDUCED_BYTES.fetch_add(std::mem::size_of_val(v) as u64, Ordering::Relaxed);
    add_ns(&REDUCE_NS, t0);
    ::metrics::histogram!("taproot_allreduce_duration_seconds").record(t0.elapsed().as_secs_f64());
    REDUCTIONS.fetch_add(1, Ordering::Relaxed);
}

/// How long a collective may wait for the other replicas (`parallel.timeout_s`; 0: forever).
/// Past it, the rank stops the run naming the ranks that did not join (see `mpi.rs`).
pub fn set_timeout(seconds: u64) {
    TIMEOUT_S.store(seconds, Ordering::Relaxed);
}

/// The timeout of [`set_timeout`], if any.
pub fn timeout() -> Option<std::time::Duration> {
    Some(TIMEOUT_S.load(Ordering::Relaxed)).filter(|&s| s > 0).map(std::time::Duration::from_secs)
}

/// This process's rank (0 in a one-process run).
pub(crate) fn rank() -> usize {
    RANK.load(Ordering::Relaxed)
}

/// The number of processes of the run (1 in a one-process run).
pub(crate) fn size() -> usize {
    SIZE.load(Ordering::Relaxed)
}

/// Pipeline stages per replica (`parallel.pipeline`).
pub(crate) fn stages() -> usize {
    STAGES.load(Ordering::Relaxed)
}

/// This process's pipeline stage (0: the scheduler, the embedding and the head).
pub(crate) fn stage() -> usize {
    STAGE.load(Ordering::Relaxed)
}

/// Data-parallel replicas (`parallel.data`).
pub(crate) fn replicas() -> usize {
    size() / stages()
}

/// This process's replica.
pub(crate) fn replica() -> usize {
    rank() / stages()
}

/// Send `bytes` to stage `to` of this replica (non-blocking: the communication thread sends
/// it; frames to one stage arrive in the order they were sent).
pub fn send_frame(to: usize, bytes: Vec<u8>) {
    submit(Job::Send { to, bytes });
}

/// The frames other stages of this replica send here: (their stage, bytes), in the order each
/// sent them. Given once (None after).
pub fn take_incoming() -> Option<mpsc::Receiver<Frame>> {
    INCOMING.lock().expect("incoming lock").take()
}

/// The element-wise maximum of `x` over the replicas of this stage (in place).
pub fn all_max_u64(x: &mut [u64]) {
    if replicas() > 1 {
        let (tx, rx) = mpsc::channel();
        submit(Job::MaxU64(x.to_vec(), tx));
        x.copy_from_slice(&rx.recv().expect("the communication thread ended during a run"));
    }
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

/// This process's HTTP address when several processes of a run share hosts: the port of
/// `listen` plus the local rank (port 0, "any free port", stays 0).
pub fn rank_listen(listen: &str, local_rank: usize) -> String {
    match listen.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?))) {
        Some((h, p)) if p > 0 => format!("{h}:{}", p as usize + local_rank),
        _ => listen.to_string(),
    }
}

/// Start MPI when this process was launched by an MPI launcher or the config asks for more than
/// one process; then check that every process states the same [`Facts`] (see [`agree`]) and
/// that the world has `data × pipeline` processes.
pub fn init(data: usize, pipeline: usize, facts: impl FnOnce() -> Facts) -> Result<Topology> {
    let Some(want) = data.checked_mul(pipeline) else {
        bail!("`parallel.data` × `parallel.pipeline` = {data} × {pipeline} overflows");
    };
    // One process in a build without MPI runs as it would anywhere, launcher or not.
    if want <= 1 && (!launched_by_mpi() || !cfg!(feature = "mpi")) {
        return Ok(Topology::ALONE);
    }
    imp::init()?;
    let n = size();
    // Agreement first: ranks that disagree on `parallel` itself must all stop here, together.
    if n > 1 {
        if let Some(msg) = imp::exchange_facts(&facts()) {
            if rank() != 0 {
                // Rank 0 says it first; the others follow it (the first abort ends them all).
                std::thread::sleep(std::time::Duration::from_millis(1500));
            }
            bail!("{msg}");
        }
    }
    if n != want {
        bail!(
            "`parallel.data` × `parallel.pipeline` = {data} × {pipeline} = {want}, but this run has {n} process{}: start it with `mpirun -np {want}` (or `taproot launch --config FILE`)",
            if n == 1 { "" } else { "es" }
        );
    }
    STAGES.store(pipeline, Ordering::Relaxed);
    STAGE.store(rank() % pipeline, Ordering::Relaxed);
    if n > 1 {
        let (tx, rx) = mpsc::channel();
        let (in_tx, in_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        *JOBS.lock().expect("jobs lock") = Some(tx);
        *INCOMING.lock().expect("incoming lock") = Some(in_rx);
        let t = std::thread::Builder::new().name("taproot-mpi".into()).spawn(move || serve(rx, ready_tx, in_tx))?;
        *THREAD.lock().expect("thread lock") = Some(t);
        // The thread splits the world into the replica and pipeline communicators first.
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("setting up the communicators: {e}"),
            Err(_) => bail!("the communication thread ended while setting up"),
        }
        let place = watchdog::Place { limit: timeout(), stages: stages(), stage: stage(), replica: replica(), rank: rank() };
        watchdog::start(place, abort);
    }
    Ok(topology())
}

/// This process's place in the run, as [`init`] made it (one process before `init`). The
/// runtime is handed the value `init` returns; this is for what runs outside a run's code
/// (the panic hook, the metrics recorder, the frame dispatcher).
pub fn topology() -> Topology {
    Topology::of_rank(rank(), replicas(), stages())
}

/// `x` summed over the replicas of this stage, in place (a no-op with one replica).
pub fn all_reduce_sum_f64(x: &mut [f64]) {
    if replicas() > 1 {
        let (tx, rx) = mpsc::channel();
        submit(Job::F64(x.to_vec(), tx));
        x.copy_from_slice(&rx.recv().expect("the communication thread ended during a run"));
    }
}

/// End MPI (after the run, on every rank): the communication thread's queue closes, then MPI
/// finalises. A no-op when it was never started.
pub fn finalize() {
    drop(JOBS.lock().expect("jobs lock").take());
    if let Some(t) = THREAD.lock().expect("thread lock").take() {
        let _ = t.join();
    }
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
#[path = "mpi.rs"]
mod imp;
#[cfg(not(feature = "mpi"))]
#[path = "no_mpi.rs"]
mod imp;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_larger_than_an_mpi_message_go_in_parts_and_come_back_whole() {
        let frame: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for max in [1, 7, 999, 1000, 1001, 4096] {
            let parts = split_frame(frame.clone(), max);
            assert_eq!(parts.len(), frame.len().div_ceil(max));
            assert!(parts.iter().all(|p| p.len() <= max + 1));
            // Two senders interleaved: each frame comes back whole, in its sender's order.
            let mut j = Joiner::default();
            let mut whole = Vec::new();
            for p in &parts {
                if let Some(f) = j.push(1, p.clone()) {
                    whole.push(f);
                }
                if let Some(f) = j.push(2, vec![42, 0]) {
                    whole.push(f);
                }
            }
            assert_eq!(whole.iter().filter(|f| **f == frame).count(), 1, "max {max}");
            assert_eq!(whole.iter().filter(|f| **f == [42]).count(), parts.len());
        }
        // An empty frame is one part.
        assert_eq!(split_frame(Vec::new(), 8), vec![vec![0u8]]);
    }

    #[test]
    fn ranks_on_one_host_listen_on_consecutive_ports() {
        assert_eq!(rank_listen("127.0.0.1:9464", 0), "127.0.0.1:9464");
        assert_eq!(rank_listen("127.0.0.1:9464", 3), "127.0.0.1:9467");
        assert_eq!(rank_listen("0.0.0.0:0", 2), "0.0.0.0:0");
        assert_eq!(rank_listen("[::1]:9000", 1), "[::1]:9001");
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
