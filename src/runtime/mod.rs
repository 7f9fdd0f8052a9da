//! The actor pipeline runtime: every transformer layer is an actor pinned to a stream of its
//! device, so growing depth is spawning new layer actors at the bottom of a live pipeline.
//!
//! ```text
//!   SupervisorActor (supervision root; every actor below is linked to it)
//!     └─ SchedulerActor (step clock, WSD, micro-batches in flight, growth at τ, checkpoints)
//!          spawns:
//!          EmbedHead (embedding) ─► Layer 0 ─► … ─► Layer L-1 ─► EmbedHead (head, loss)
//!                                ◄─          ◄─             ◄─             (gradients)
//! ```
//!
//! The files, each one actor or one concept; dependencies run one way
//! (`handoff` ← `layer`, `embed_head` ← `scheduler` ← `supervisor`):
//! - [`handoff`]: what neighbours exchange (`Handoff`, `Activation`, `Peer`, `MicroDone`).
//! - [`layer`]: `LayerActor`, one transformer block.
//! - [`embed_head`]: `EmbedHeadActor`, the token embedding and the tied head with the loss, both
//!   ends of the ring in one actor.
//! - [`scheduler`]: `SchedulerActor`, the step clock; [`scheduler::growth`] is growth at τ.
//! - [`supervisor`]: `SupervisorActor`, and [`train`] / [`start`], the entry points.
//! - [`stage`]: the layers of this process (spawn, name, route, link), for stage 0 and a
//!   hosting stage alike.
//! - [`grad_sync`]: a unit's gradient all-reduce over the replicas, and ZeRO-1.
//! - [`frame`], [`remote`], [`host`]: a pipeline split over processes (stages): the frames
//!   between them, the stand-ins of layers on other stages, a hosting stage's loop.
//! - [`placement`]: layers to devices. [`events`]: what the runtime reports. [`metrics`]: the
//!   metrics actor. [`error`]: [`RunError`].
//!
//! ## The path of one training micro-batch
//!
//! 1. **Issue.** The scheduler takes the next (B, T+1) windows from the data loader and sends
//!    `EmbedHeadMsg::Micro { mb, windows, dscale }` — only while fewer than `max_in_flight`
//!    micro-batches are in flight (mailboxes are unbounded; the bound is the scheduler's).
//! 2. **Embed.** The embed-head actor uploads the ids, computes x = wte[ids] + wpe and hands
//!    `Handoff::Forward { mb, x }` to its `first` peer: layer 0 (or itself, with no layers).
//! 3. **Layers.** Each layer actor waits on the activation's event, runs its block forward
//!    (stashing what backward needs under `mb`) and hands the output up to its `next` peer;
//!    the top layer's `next` is the embed-head actor.
//! 4. **Head and loss.** The embed-head actor runs the final LayerNorm, the tied head, softmax and
//!    cross-entropy, keeps the loss, and hands the gradient of the top activation down:
//!    `Handoff::Backward { mb, grad }` to its `last` peer (the top layer).
//! 5. **Back.** Each layer runs its block backward (accumulating its own parameter gradients)
//!    and hands the input gradient to its `prev` peer, down to the embed-head actor.
//! 6. **Done.** The embed-head actor accumulates the embedding gradient and tells the scheduler
//!    `MicroDone { mb, loss }`; the scheduler issues the next micro-batch of the step.
//! 7. **Step barrier.** When all `micro_batches` of the step are done, the scheduler sends
//!    `Step { lr }` to every layer actor and the embed-head actor and waits for all of them (each answers with the sum of
//!    squares of its gradients, for the gradient norm); then it logs the step, evaluates or
//!    checkpoints when due, applies growth when the plan says so, and issues the next step.
//!
//! An evaluation micro-batch takes steps 1–4 only (`EvalMicro`, no stash); the head reports
//! `MicroDone` with its loss at step 4.
//!
//! CPU-heavy handler bodies run inside `block_in_place` ([`compute`]), so the tokio workers keep
//! serving other tasks (the metrics endpoint) during a step; all CPU math shares the one rayon
//! pool. The sequential trainer (`train::sequential`) computes exactly the same thing and is the
//! oracle of the runtime's tests.

pub mod embed_head;
pub mod error;
pub mod events;
pub mod frame;
pub mod grad_sync;
pub mod handoff;
pub mod host;
pub mod layer;
pub mod metrics;
pub mod placement;
pub mod remote;
pub mod scheduler;
pub mod stage;
pub mod supervisor;

pub use crate::train::RunOptions;
pub use error::RunError;
pub use scheduler::Status;
pub use supervisor::{start, train, train_async, RunHandle};

use ractor::ActorId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Actor id → what it is ("layer 3 (cpu:1)"), so that the supervisor can name a failed actor.
pub type Roles = Arc<Mutex<HashMap<ActorId, String>>>;

/// How a stage's stream computes: the precision of its products, its attention algorithm and
/// its activations' storage (`precision.compute`, `kernels.attention`, `precision.storage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSettings {
    pub precision: crate::backend::Precision,
    pub attention: crate::backend::Attention,
    /// What activations are stored in (`precision.storage`).
    pub storage: crate::backend::Precision,
}

impl StreamSettings {
    pub fn of(cfg: &crate::config::Config) -> Self {
        StreamSettings { precision: cfg.compute_precision(), attention: cfg.kernels.attention, storage: cfg.precision.storage }
    }
    /// Apply to a stream (precision first: flash attention on CUDA needs bf16).
    pub fn apply<B: crate::backend::Backend>(&self, be: &B) -> anyhow::Result<()> {
        be.set_precision(self.precision)?;
        be.set_storage(self.storage)?;
        be.set_attention(self.attention)
    }
}

/// Open a stage's stream on `device` with `settings`.
pub fn open_stream<B: crate::backend::Backend>(device: &str, settings: StreamSettings) -> anyhow::Result<B> {
    let be = B::open(device)?;
    settings.apply(&be)?;
    Ok(be)
}

/// Run CPU-heavy work without stalling the async workers (the metrics endpoint, other actors'
/// mailboxes): the worker thread hands its other tasks off while this closure runs.
pub fn compute<R>(f: impl FnOnce() -> R) -> R {
    compute_plain(f)
}

/// [`compute`] for a unit's run of ops on stream `be`: the CPU backend runs it on a thread of its
/// compute pool ([`Backend::within`]).
pub fn compute_on<B: crate::backend::Backend, R>(be: &B, f: impl FnOnce() -> R) -> R {
    compute_plain(|| be.within(f))
}

fn compute_plain<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
