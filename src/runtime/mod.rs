//! The actor pipeline runtime: every transformer layer is an actor pinned to a stream of its
//! device, so growing depth is spawning new layer actors at the bottom of a live pipeline.
//!
//! ```text
//!   Trainer (supervision root)
//!     └─ Scheduler (step clock, WSD, micro-batches in flight, growth at τ, checkpoints)
//!          spawns, linked to the Trainer:
//!          Ends (embedding + tied head) ─► Layer 0 ─► … ─► Layer L-1 ─► Ends   (activations)
//!                                      ◄─          ◄─             ◄─         (gradients)
//! ```
//!
//! - [`layer`]: `LayerActor`, one block. [`ends`]: `EndsActor`, embedding and head (the ring).
//! - [`scheduler`]: `SchedulerActor`, the step clock and the growth plan.
//! - [`trainer`]: `TrainerActor`, supervision (stop with a clear error, or restart from the
//!   newest checkpoint).
//! - [`placement`]: layers to devices, and where layers born at τ go.
//! - [`metrics`]: `MetricsActor`, the runtime's events as Prometheus metrics.
//!
//! CPU-heavy handler bodies run inside `block_in_place` ([`messages::compute`]), so the tokio
//! workers keep serving other tasks (the metrics endpoint) during a step; all CPU math shares the
//! one rayon pool. The sequential trainer (`train::sequential`) computes exactly the same thing
//! and is the oracle of the runtime's tests.

pub mod ends;
pub mod events;
pub mod layer;
pub mod messages;
pub mod metrics;
pub mod placement;
pub mod scheduler;
pub mod trainer;

use crate::backend::Backend;
use crate::config::Config;
use crate::data::Dataset;
use crate::train::TrainReport;
use ractor::Actor;
pub use scheduler::SchedOptions;
use std::sync::Arc;
use trainer::{TrainerActor, TrainerArgs, TrainerMsg};

/// Train `cfg` on the actor runtime; blocks until the run ends. With `signals`, SIGINT and
/// SIGTERM stop the run at the next step boundary after writing a checkpoint.
pub fn train<B: Backend>(cfg: &Config, data: Dataset, opts: SchedOptions, signals: bool) -> anyhow::Result<TrainReport> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(train_async::<B>(cfg, data, opts, signals))
}

/// A run in progress: its supervision root (send it `TrainerMsg`s: status, pause, grow now, …)
/// and the promise of its result.
pub struct RunHandle {
    pub trainer: ractor::ActorRef<TrainerMsg>,
    pub done: tokio::sync::oneshot::Receiver<Result<TrainReport, String>>,
    pub join: ractor::concurrency::JoinHandle<()>,
}

impl RunHandle {
    /// Wait for the run to end.
    pub async fn wait(self) -> anyhow::Result<TrainReport> {
        let result = self.done.await.map_err(|_| anyhow::anyhow!("the trainer stopped without a result"))?;
        let _ = self.join.await;
        result.map_err(|e| anyhow::anyhow!(e))
    }
}

/// Start a run inside an existing multi-thread tokio runtime; events go to `observer`.
pub async fn start<B: Backend>(cfg: &Config, data: Dataset, opts: SchedOptions, observer: events::Observer) -> anyhow::Result<RunHandle> {
    // Every device of the placement must exist before any actor starts: a clear error naming
    // the key, rather than a failed actor halfway through a growth.
    let mut seen = std::collections::HashSet::new();
    for d in cfg.placement.devices.iter().chain(cfg.placement.ends.iter()) {
        if seen.insert(d.clone()) {
            B::open(d).map_err(|e| anyhow::anyhow!("`placement.devices`: {d}: {e:#}"))?;
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let args = TrainerArgs { cfg: cfg.clone(), data: Arc::new(data), opts, done: tx, observer };
    let (trainer, join) =
        Actor::spawn(None, TrainerActor::<B>::default(), args).await.map_err(|e| anyhow::anyhow!("starting the trainer: {e}"))?;
    Ok(RunHandle { trainer, done: rx, join })
}

/// [`train`] inside an existing multi-thread tokio runtime.
pub async fn train_async<B: Backend>(cfg: &Config, data: Dataset, opts: SchedOptions, signals: bool) -> anyhow::Result<TrainReport> {
    let run = start::<B>(cfg, data, opts, events::none()).await?;
    let trainer = run.trainer.clone();
    let watcher = signals.then(|| {
        let t = trainer.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                let _ = t.cast(TrainerMsg::RequestStop);
            }
        })
    });
    let result = run.wait().await;
    if let Some(w) = watcher {
        w.abort();
    }
    result
}
