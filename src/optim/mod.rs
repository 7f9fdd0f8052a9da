//! Optimizers (METHOD.md, "Optimizer"): `muon_nsgd` (the paper's, default), `adamw`, `muon_adamw`.
//!
//! State is per unit, in the unit's own layout ([`OptState`]): a first-moment buffer `m` (Muon
//! and NSGD momentum, or Adam's m), a second-moment buffer `v` (allocated only when some tensor
//! of the unit uses AdamW), and **one step counter per tensor**, so a block born at step τ starts
//! its own AdamW bias correction at 0 while older tensors continue theirs.
//!
//! Which rule a tensor gets:
//! - `muon_nsgd`: Muon on every 2-D tensor, normalised SGD on every other tensor. The embeddings
//!   (`wte`, `wpe`) follow `embedding_optimizer` (default `muon`, as the paper's text reads).
//! - `adamw`: AdamW everywhere.
//! - `muon_adamw`: Muon on block matrices, AdamW on embeddings, gains and biases.
//!
//! Weight decay is decoupled (p ← p − lr·wd·p) and applies to matrices only, under every
//! optimizer (a decision where METHOD.md names one coefficient per optimizer: decaying LayerNorm
//! gains toward 0 is not what anyone intends). No gradient clipping.

pub mod adamw;
pub mod muon;
pub mod schedule;

use crate::backend::{Backend, View};
use crate::model::{Layout, ParamSet, ParamSpec};
use serde::{Deserialize, Serialize};

pub use muon::Scratch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    MuonNsgd,
    Adamw,
    MuonAdamw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingOptimizer {
    #[default]
    Muon,
    Nsgd,
}

/// Every optimizer hyperparameter; defaults are METHOD.md's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    /// Muon/NSGD momentum.
    pub momentum: f32,
    pub nesterov: bool,
    pub ns_steps: usize,
    pub ns_coeffs: [f32; 3],
    /// Decoupled weight decay; `None` means the kind's default (0.01 Muon-NSGD, 0.1 AdamW).
    pub weight_decay: Option<f32>,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub embedding_optimizer: EmbeddingOptimizer,
    /// `muon_adamw` only: the AdamW tensors use lr × this.
    pub adam_lr_scale: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimizerKind::MuonNsgd,
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
            ns_coeffs: [3.4445, -4.7750, 2.0315],
            weight_decay: None,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            embedding_optimizer: EmbeddingOptimizer::Muon,
            adam_lr_scale: 1.0,
        }
    }
}

impl OptimConfig {
    pub fn weight_decay(&self) -> f32 {
        self.weight_decay.unwrap_or(match self.kind {
            OptimizerKind::MuonNsgd => 0.01,
            OptimizerKind::Adamw | OptimizerKind::MuonAdamw => 0.1,
        })
    }

    /// The update rule of one tensor.
    pub fn rule(&self, spec: &ParamSpec) -> Rule {
        let embedding = spec.is_embedding;
        match self.kind {
            OptimizerKind::Adamw => Rule::AdamW,
            OptimizerKind::MuonAdamw => {
                if spec.is_matrix() && !embedding {
                    Rule::Muon
                } else {
                    Rule::AdamW
                }
            }
            OptimizerKind::MuonNsgd => {
                if embedding && self.embedding_optimizer == EmbeddingOptimizer::Nsgd {
                    Rule::Nsgd
                } else if spec.is_matrix() {
                    Rule::Muon
                } else {
                    Rule::Nsgd
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Muon,
    Nsgd,
    AdamW,
}

/// A unit's optimizer state, in the unit's layout.
pub struct OptState<B: Backend> {
    /// First moment / momentum, same layout as the parameters.
    pub m: B::Buf,
    /// Second moment (AdamW only), allocated on first use.
    pub v: Option<B::Buf>,
    /// Steps taken by each tensor (index = the tensor's index in the layout).
    pub steps: Vec<u64>,
}

impl<B: Backend> OptState<B> {
    pub fn new(be: &B, layout: &Layout) -> Self {
        OptState { m: be.alloc(layout.total), v: None, steps: vec![0; layout.specs.len()] }
    }

    /// Zero every moment and step counter (the `reset` policy).
    pub fn reset(&mut self, be: &B) {
        be.fill(B::whole(&self.m), 0.0);
        if let Some(v) = &self.v {
            be.fill(B::whole(v), 0.0);
        }
        self.steps.iter_mut().for_each(|s| *s = 0);
    }

    /// Copy all state from `src` (same layout), e.g. a copied block inheriting its source's.
    pub fn copy_from(&mut self, be: &B, src: &OptState<B>) {
        be.copy(B::whole(&self.m), B::whole(&src.m));
        match (&src.v, &self.v) {
            (Some(sv), Some(dv)) => be.copy(B::whole(dv), B::whole(sv)),
            (Some(sv), None) => {
                let dv = be.alloc(B::buf_len(sv));
                be.copy(B::whole(&dv), B::whole(sv));
                self.v = Some(dv);
            }
            (None, Some(dv)) => be.fill(B::whole(dv), 0.0),
            (None, None) => {}
        }
        self.steps.clone_from(&src.steps);
    }
}

/// The optimizer: stateless itself (state lives in each unit), so every stage can hold a copy.
#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub cfg: OptimConfig,
}

impl Optimizer {
    pub fn new(cfg: OptimConfig) -> Self {
        Optimizer { cfg }
    }

    /// One update of every tensor of a unit with learning rate `lr`. Gradients are left as they
    /// are (the caller zeroes them for the next accumulation).
    pub fn step<B: Backend>(&self, be: &B, set: &mut ParamSet<B>, scratch: &mut Scratch<B>, lr: f32) {
        let wd_all = self.cfg.weight_decay();
        for (i, spec) in set.layout.specs.iter().enumerate() {
            let wd = if spec.is_matrix() { wd_all } else { 0.0 };
            let (off, n) = (spec.offset, spec.numel());
            let p = View::new(&set.params, off, n);
            let g = View::new(&set.grads, off, n);
            let m = View::new(&set.state.m, off, n);
            set.state.steps[i] += 1;
            match self.cfg.rule(spec) {
                Rule::Muon => muon::muon_update(be, &self.cfg, p, g, m, spec.rows(), spec.cols(), scratch, lr, wd),
                Rule::Nsgd => muon::nsgd_update(be, &self.cfg, p, g, m, scratch, lr, wd),
                Rule::AdamW => {
                    if set.state.v.is_none() {
                        set.state.v = Some(be.alloc(set.layout.total));
                    }
                    let v = View::new(set.state.v.as_ref().expect("allocated above"), off, n);
                    let lr = if self.cfg.kind == OptimizerKind::MuonAdamw { lr * self.cfg.adam_lr_scale } else { lr };
                    let c = &self.cfg;
                    be.adamw_update(p, g, m, v, lr, c.beta1, c.beta2, c.eps, wd, set.state.steps[i]);
                }
            }
        }
    }
}
