//! A pipeline stage that stops answering, seen from stage 0.
//! (Stage 0 marks the time it waits on the other stages: a training step with its optimizer
//! barrier, an evaluation, the gathering of a checkpoint's units.)
//!
//! Frames between the stages of a replica are point-to-point: a stage that is stopped (SIGSTOP),
//! stuck on its device or gone never fails a collective, and stage 0 would wait for its
//! micro-batches forever. So stage 0's scheduler marks each training step ([`step_began`],
//! [`step_ended`]), the communication thread notes when a frame last came from each stage
//! ([`heard_from`]), and a watchdog thread checks once a second: a step in progress for longer
//! than `parallel.timeout_s` while a stage has sent nothing for that long stops the run, naming
//! the stage and its rank (`MPI_Abort`; the newest checkpoint stands). Outside steps (evaluation,
//! a checkpoint, a pause) nothing is timed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Milliseconds since [`start`] when a frame last came from each stage.
static HEARD: Mutex<Vec<u64>> = Mutex::new(Vec::new());
/// The step in progress (+1; 0: none) and since when (milliseconds since [`start`]).
static STEP: AtomicU64 = AtomicU64::new(0);
static STEP_SINCE_MS: AtomicU64 = AtomicU64::new(0);
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Milliseconds since this process first asked (the clock of both watchdogs).
pub(super) fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A frame came from stage `from` of this replica.
pub fn heard_from(from: usize) {
    let now = now_ms();
    let mut h = HEARD.lock().expect("watchdog lock");
    if h.len() <= from {
        h.resize(from + 1, now);
    }
    h[from] = now;
}

/// Stage 0 starts training step `step`.
pub fn step_began(step: u64) {
    STEP_SINCE_MS.store(now_ms(), Ordering::Relaxed);
    STEP.store(step + 1, Ordering::Relaxed);
}

/// Stage 0's step is over (every micro-batch came back).
pub fn step_ended() {
    STEP.store(0, Ordering::Relaxed);
}

/// The stages silent for longer than `limit_ms` during a step that has lasted that long, as of
/// `now` (ms); empty when all is well.
fn silent(now: u64, limit_ms: u64, stages: usize) -> Vec<usize> {
    if STEP.load(Ordering::Relaxed) == 0 || now.saturating_sub(STEP_SINCE_MS.load(Ordering::Relaxed)) <= limit_ms {
        return Vec::new();
    }
    let h = HEARD.lock().expect("watchdog lock");
    (1..stages).filter(|&q| now.saturating_sub(h.get(q).copied().unwrap_or(0)) > limit_ms).collect()
}

/// Where this process stands: the timeout, stages per replica, its stage, replica and rank.
pub struct Place {
    pub limit: Option<std::time::Duration>,
    pub stages: usize,
    pub stage: usize,
    pub replica: usize,
    pub rank: usize,
}

/// Start the watchdog on stage 0 of a pipelined run (a no-op elsewhere, or without a timeout);
/// `abort` stops every process of the run.
pub fn start(p: Place, abort: fn(i32)) {
    let (Some(limit), true, true) = (p.limit, p.stages > 1, p.stage == 0) else { return };
    let stages = p.stages;
    {
        let now = now_ms();
        *HEARD.lock().expect("watchdog lock") = vec![now; stages];
    }
    let spawned = std::thread::Builder::new().name("taproot-watchdog".into()).spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let quiet = silent(now_ms(), limit.as_millis() as u64, stages);
        if !quiet.is_empty() {
            let base = p.replica * stages;
            let who: Vec<String> = quiet.iter().map(|&q| format!("pipeline stage {q} (rank {})", base + q)).collect();
            eprintln!(
                "error (rank {}): {} sent nothing for {} s during step {} (`parallel.timeout_s`): stopped, stuck on its device, or gone. Stopping every rank; the newest checkpoint on disk stands (`--resume` continues from it).",
                p.rank,
                who.join(", "),
                limit.as_secs(),
                STEP.load(Ordering::Relaxed).saturating_sub(1)
            );
            abort(3);
        }
    });
    if let Err(e) = spawned {
        eprintln!("warning: no watchdog of the pipeline stages: {e}");
    }
}
