//! The MPI side of `crate::dist` (the `mpi` cargo feature): start and end MPI, the
//! communicators of a process, its collectives and its non-blocking frame sends.

use super::{RANK, SIZE};
use anyhow::{bail, Context, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::point_to_point::MatchedReceiveVec;
use mpi::request::{Request, StaticScope};
use mpi::topology::{Color, Communicator, SimpleCommunicator};
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

/// The communicators of this process: its stage's replicas (gradient sums) and its
/// replica's stages (pipeline frames). Made by the communication thread, which alone uses
/// them.
pub struct Comms {
    replicas: SimpleCommunicator,
    pipeline: SimpleCommunicator,
    /// Collectives started on the replica communicator so far (this rank's count).
    started: std::cell::Cell<u64>,
    /// The highest collective number each replica announced (see [`Comms::collective`]), and
    /// when its last announcement came.
    seen: std::cell::RefCell<Vec<(u64, Option<std::time::Instant>)>>,
    /// Announcements on their way.
    beats: std::cell::RefCell<Vec<SendRequest>>,
}

/// The tag of a collective's announcement on the replica communicator.
const BEAT: i32 = 7;
/// How long, once a stop was asked for, a collective waits for a missing rank.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A frame on its way: the request and the buffer it reads, freed when it completes.
pub struct SendRequest {
    req: Option<Request<'static, [u8], StaticScope>>,
    buf: *mut [u8],
}

// The raw buffer is owned by this request alone (leaked from a Box at the send).
unsafe impl Send for SendRequest {}

impl SendRequest {
    /// Whether the send has completed (then its buffer is freed).
    pub fn done(&mut self) -> bool {
        match self.req.take().expect("a pending request").test() {
            Ok(_) => {
                // SAFETY: the buffer came from `Box::leak` in `Comms::send` and MPI no longer
                // reads it: its request has completed.
                drop(unsafe { Box::from_raw(self.buf) });
                true
            }
            Err(r) => {
                self.req = Some(r);
                false
            }
        }
    }
}

/// Start sending `bytes` to rank `to` of `comm` with `tag`.
fn send_on(comm: &SimpleCommunicator, to: usize, bytes: Vec<u8>, tag: i32) -> SendRequest {
    let buf: &'static mut [u8] = Box::leak(bytes.into_boxed_slice());
    let ptr: *mut [u8] = buf;
    // SAFETY: `ptr` stays valid until `SendRequest::done` frees it after completion.
    let read: &'static [u8] = unsafe { &*ptr };
    let req = comm.process_at_rank(to as i32).immediate_send_with_tag(StaticScope, read, tag);
    SendRequest { req: Some(req), buf: ptr }
}

impl Comms {
    pub fn new(stage: usize, replica: usize) -> Result<Self> {
        let w = world();
        let replicas =
            w.split_by_color_with_key(Color::with_value(stage as i32), replica as i32).context("splitting the world by pipeline stage")?;
        let pipeline =
            w.split_by_color_with_key(Color::with_value(replica as i32), stage as i32).context("splitting the world by replica")?;
        let n = replicas.size() as usize;
        Ok(Comms { replicas, pipeline, started: 0.into(), seen: vec![(0, None); n].into(), beats: Vec::new().into() })
    }

    pub fn all_reduce_f32(&self, send: &[f32], recv: &mut [f32]) {
        self.collective(send, recv, SystemOperation::sum(), "a gradient all-reduce");
    }

    pub fn all_reduce_f64(&self, send: &[f64], recv: &mut [f64]) {
        self.collective(send, recv, SystemOperation::sum(), "the step's agreement (loss and requests)");
    }

    pub fn all_max_u64(&self, send: &[u64], recv: &mut [u64]) {
        self.collective(send, recv, SystemOperation::max(), "a comparison of the replicas' weights");
    }

    /// One all-reduce over the replicas, which waits at most `parallel.timeout_s` (and does not
    /// spin a core while it waits). Each rank announces the collective's number to every other
    /// replica when it starts it, and again every second while it waits; when the wait runs
    /// out, the ranks named are those whose announcement of this number never came, or whose
    /// last one is older than half the timeout (a rank stopped inside the collective): stopped
    /// (SIGSTOP), stuck on a device, or gone. The rank then stops the whole run (`MPI_Abort`),
    /// since a collective cannot be taken back.
    fn collective<T: Equivalence>(&self, send: &[T], recv: &mut [T], op: SystemOperation, what: &str) {
        let k = self.started.get() + 1;
        self.started.set(k);
        let me = self.replicas.rank() as usize;
        let n = self.replicas.size() as usize;
        let announce = || {
            let mut beats = self.beats.borrow_mut();
            beats.retain_mut(|b| !b.done());
            for r in (0..n).filter(|&r| r != me) {
                beats.push(send_on(&self.replicas, r, k.to_le_bytes().to_vec(), BEAT));
            }
        };
        announce();
        let timeout = super::timeout();
        let t0 = std::time::Instant::now();
        let mut announced = t0;
        mpi::request::scope(|scope| {
            let mut req = self.replicas.immediate_all_reduce_into(scope, send, recv, op);
            let mut idle = 0u32;
            loop {
                match req.test() {
                    Ok(_) => break,
                    Err(r) => req = r,
                }
                self.take_beats();
                if announced.elapsed() > std::time::Duration::from_secs(1) {
                    announce();
                    announced = std::time::Instant::now();
                }
                // A stop was asked for (mpirun forwards SIGTERM, and sends one when a rank
                // died): a rank missing for STOP_GRACE is taken as gone, said plainly, rather
                // than waited for until the timeout or mpirun's kill.
                let stopping = crate::signals::received() > 0 && t0.elapsed() > STOP_GRACE;
                let limit = if stopping { Some(STOP_GRACE) } else { timeout.filter(|l| t0.elapsed() > *l) };
                if let Some(limit) = limit {
                    let seen = self.seen.borrow();
                    let stages = super::stages();
                    let stale = |at: Option<std::time::Instant>| at.is_none_or(|t| t.elapsed() > limit / 2);
                    let missing: Vec<String> = (0..n)
                        .filter(|&r| r != me && (seen[r].0 < k || stale(seen[r].1)))
                        .map(|r| format!("rank {} (replica {r})", r * stages + super::stage()))
                        .collect();
                    let who = if missing.is_empty() {
                        "a rank that is waiting in it too (an MPI failure)".to_string()
                    } else {
                        missing.join(", ")
                    };
                    let why = if stopping {
                        format!(
                            "within {} s of a stop request: it is gone or stuck, so no final checkpoint can be written (the step needs it)",
                            limit.as_secs()
                        )
                    } else {
                        format!("within {} s (`parallel.timeout_s`): stopped, stuck on its device, or gone", limit.as_secs())
                    };
                    eprintln!(
                        "error (rank {}): {who} did not join {what} (collective #{k}) {why}. Stopping every rank; the newest checkpoint on disk stands (`--resume` continues from it).",
                        super::rank()
                    );
                    world().abort(3);
                }
                // 20 µs doubling to 1 ms: a wait for a slow rank costs no core.
                std::thread::sleep(std::time::Duration::from_micros((20u64 << idle.min(6)).min(1000)));
                idle += 1;
            }
        });
    }

    /// Record the announcements that have arrived.
    fn take_beats(&self) {
        let mut seen = self.seen.borrow_mut();
        while let Some(probed) = self.replicas.any_process().immediate_matched_probe_with_tag(BEAT) {
            let from = probed.1.source_rank() as usize;
            let (bytes, _) = probed.matched_receive_vec::<u8>();
            if let (Some(s), Ok(b)) = (seen.get_mut(from), <[u8; 8]>::try_from(bytes.as_slice())) {
                *s = (s.0.max(u64::from_le_bytes(b)), Some(std::time::Instant::now()));
            }
        }
    }

    /// Wait for the announcements still on their way (before MPI ends).
    pub fn finish_beats(&self) {
        let mut beats = self.beats.borrow_mut();
        while !beats.is_empty() {
            beats.retain_mut(|b| !b.done());
            self.take_beats();
            std::thread::yield_now();
        }
    }

    /// Start sending `bytes` to stage `to`.
    pub fn send(&self, to: usize, bytes: Vec<u8>) -> SendRequest {
        send_on(&self.pipeline, to, bytes, 0)
    }

    /// A frame that has arrived, if any: (its stage, its bytes).
    pub fn receive(&self) -> Option<(usize, Vec<u8>)> {
        let probed = self.pipeline.any_process().immediate_matched_probe()?;
        let from = probed.1.source_rank() as usize;
        let (bytes, _) = probed.matched_receive_vec::<u8>();
        Some((from, bytes))
    }
}

/// Compare every rank's facts: `None` when they all agree, else the message naming the ranks and
/// keys that differ from rank 0 (the same on every rank). Collective over the world; made before
/// the communication thread starts.
pub fn exchange_facts(mine: &super::Facts) -> Option<String> {
    use super::agree::{message, Facts, MESSAGE_BYTES};
    let w = world();
    let n = w.size() as usize;
    let mut digests = vec![0u64; n];
    w.all_gather_into(&mine.digest(), &mut digests[..]);
    if digests.iter().all(|&d| d == digests[0]) {
        return None;
    }
    let root = w.process_at_rank(0);
    let mut text = if w.rank() == 0 { mine.text().into_bytes() } else { Vec::new() };
    let mut len = text.len() as u64;
    root.broadcast_into(&mut len);
    text.resize(len as usize, 0);
    root.broadcast_into(&mut text[..]);
    let rank0 = Facts::parse(&String::from_utf8_lossy(&text));
    let mut diff = mine.differences(&rank0, w.rank() as usize).into_bytes();
    diff.resize(MESSAGE_BYTES, 0);
    let mut all = vec![0u8; MESSAGE_BYTES * n];
    w.all_gather_into(&diff[..], &mut all[..]);
    let per_rank: Vec<String> = all
        .chunks(MESSAGE_BYTES)
        .map(|c| String::from_utf8_lossy(&c[..c.iter().position(|&b| b == 0).unwrap_or(c.len())]).into_owned())
        .collect();
    // Digests differ but no key does (a hash collision of the texts cannot be, so this is the
    // binary's own nondeterminism): say so rather than start.
    message(&per_rank).or_else(|| Some("the processes of this run state different facts, yet no key differs".to_string()))
}

pub fn finalize() {
    // Dropping the universe calls MPI_Finalize.
    drop(UNIVERSE.lock().expect("MPI universe lock").take());
}

pub fn abort(code: i32) {
    world().abort(code);
}
