//! What the runtime tells the outside world: one [`Event`] per thing that happened, delivered to
//! an [`Observer`] (the metrics actor, a progress bar, a test). Observers must be cheap: they are
//! called from actor handlers.

use crate::model::growth::GrowthRecord;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// An optimizer step finished.
    Step {
        /// Updates done.
        step: u64,
        total_steps: u64,
        depth: usize,
        lr: f32,
        train_loss: f32,
        /// Tokens in this step, and in the run so far (this process).
        tokens: u64,
        /// Wall seconds of this step (micro-batches, barrier and optimizer).
        seconds: f64,
        /// Cumulative FLOPs, llm.c and non-embedding conventions.
        flops_llmc: f64,
        flops_ne: f64,
        /// Cumulative non-embedding FLOPs the fixed-size (target depth) model would have spent.
        fixed_flops_ne: f64,
        /// ‖g‖ over every parameter of the model before the update.
        grad_norm: f64,
        /// Parameters of the model at this step: (total, non-embedding).
        params: (u64, u64),
        /// Training tokens drawn so far from each source of the data, by name (one entry for a
        /// single folder).
        sources: Vec<(String, u64)>,
    },
    Eval {
        step: u64,
        depth: usize,
        val_loss: f32,
    },
    /// A text sample drawn from the model at an evaluation (`eval.sample_tokens`).
    Sample {
        step: u64,
        depth: usize,
        text: String,
    },
    /// An expansion was applied, taking `seconds` of wall time.
    Growth {
        record: GrowthRecord,
        seconds: f64,
    },
    Checkpoint {
        step: u64,
        path: String,
        seconds: f64,
        bytes: u64,
    },
    /// One stage handler's compute time for a micro-batch.
    LayerTime {
        layer: u64,
        device: String,
        backward: bool,
        seconds: f64,
    },
    /// After each step, per mixture-of-experts layer: the tokens routed to each of its experts
    /// during the step (k per token).
    ExpertLoad {
        layer: u64,
        step: u64,
        load: Vec<u64>,
    },
    /// After each step, per device: activation buffers its pool has allocated so far (flat after
    /// warmup; growth means a leak), and bytes copied into it from other devices so far.
    Buffers {
        device: String,
        allocated: usize,
        peer_bytes_in: u64,
    },
    /// Micro-batches in flight right after a change.
    InFlight(usize),
    /// A non-finite loss or gradient norm.
    NonFinite {
        step: u64,
        what: String,
    },
    /// The supervisor restarted the pipeline.
    Restart {
        step: u64,
        reason: String,
    },
    Paused(bool),
}

pub type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// An observer that drops everything.
pub fn none() -> Observer {
    Arc::new(|_| {})
}
