//! Optimizers (docs/METHOD.md, "Optimizer"): `muon_nsgd` (the paper's, default), `adamw`, `muon_adamw`.
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
//! optimizer (a decision where docs/METHOD.md names one coefficient per optimizer: decaying LayerNorm
//! gains toward 0 is not what anyone intends). No gradient clipping.

pub mod adamw;
pub mod config;
pub mod muon;
pub mod schedule;

use crate::backend::{Backend, View};
use crate::params::ParamSet;

pub use config::{EmbeddingOptimizer, OptimConfig, OptimizerKind, Rule};
pub use muon::Scratch;

/// The optimizer: stateless itself (state lives in each unit), so every actor can hold a copy.
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
        // AdamW is elementwise, so a run of neighbouring AdamW tensors with the same decay and
        // step count, laid out back to back in parameters and state, is updated by one call (one
        // pass, not one small launch per bias and gain). `run` is (first offset, state offset,
        // length, decay, step) of the run being gathered.
        let mut run: Option<(usize, usize, usize, f32, u64)> = None;
        for (i, spec) in set.layout.specs.iter().enumerate() {
            let wd = if spec.is_matrix() { wd_all } else { 0.0 };
            let (off, n) = (spec.offset, spec.numel());
            set.state.steps[i] += 1;
            // ZeRO-1: another replica owns this tensor's state and update.
            let Some(so) = set.state.offset(i, spec) else { continue };
            let p = View::new(&set.params, off, n);
            let g = View::new(&set.grads, off, n);
            let m = View::new(&set.state.m, so, n);
            match self.cfg.rule(spec) {
                Rule::Fixed => {}
                Rule::Muon => muon::muon_update(be, &self.cfg, p, g, m, spec.rows(), spec.cols(), scratch, lr, wd),
                Rule::Nsgd => muon::nsgd_update(be, &self.cfg, p, g, m, scratch, lr, wd),
                Rule::AdamW => {
                    if set.state.v.is_none() {
                        set.state.v = Some(be.alloc(set.state.len()));
                    }
                    let step = set.state.steps[i];
                    run = match run {
                        Some((o0, s0, len, w, t)) if o0 + len == off && s0 + len == so && w == wd && t == step => {
                            Some((o0, s0, len + n, w, t))
                        }
                        other => {
                            if let Some(r) = other {
                                self.adamw_run(
                                    be,
                                    [&set.params, &set.grads, &set.state.m, set.state.v.as_ref().expect("allocated above")],
                                    r,
                                    lr,
                                );
                            }
                            Some((off, so, n, wd, step))
                        }
                    };
                }
            }
        }
        if let Some(r) = run {
            self.adamw_run(be, [&set.params, &set.grads, &set.state.m, set.state.v.as_ref().expect("allocated above")], r, lr);
        }
    }

    /// AdamW over `len` elements of [params, grads, m, v] from parameter offset `off` and state
    /// offset `so`.
    fn adamw_run<B: Backend>(
        &self,
        be: &B,
        [params, grads, m, v]: [&B::Buf; 4],
        (off, so, len, wd, step): (usize, usize, usize, f32, u64),
        lr: f32,
    ) {
        let (p, g) = (View::new(params, off, len), View::new(grads, off, len));
        let (m, v) = (View::new(m, so, len), View::new(v, so, len));
        let lr = if self.cfg.kind == OptimizerKind::MuonAdamw { lr * self.cfg.adam_lr_scale } else { lr };
        let c = &self.cfg;
        be.adamw_update(p, g, m, v, lr, c.beta1, c.beta2, c.eps, wd, step);
    }
}

impl Optimizer {
    /// Whether some tensor of `layout` is updated by AdamW (then the unit has a second moment
    /// once it has stepped).
    pub fn uses_adamw(&self, layout: &crate::params::Layout) -> bool {
        layout.specs.iter().any(|s| self.cfg.rule(s) == Rule::AdamW)
    }
}

/// Σ g² over a unit's gradients (for the gradient-norm metric), before the update.
/// The data-parallel side of an optimizer step: complete the gradients of the global batch
/// before the update, and (ZeRO-1) gather every replica's updated tensors after it. The runtime's
/// `GradSync` is one; [`Alone`] (one process, the sequential trainer) does nothing.
pub trait StepSync<B: Backend> {
    fn finish(&mut self, be: &B, sets: &[&ParamSet<B>]);
    fn gather(&mut self, be: &B, sets: &[&ParamSet<B>]);
}

/// No data parallelism: the gradients are already the batch's, the parameters already whole.
pub struct Alone;

impl<B: Backend> StepSync<B> for Alone {
    fn finish(&mut self, _be: &B, _sets: &[&ParamSet<B>]) {}
    fn gather(&mut self, _be: &B, _sets: &[&ParamSet<B>]) {}
}

/// One optimizer step of the units one owner holds (a layer actor's block, the embed-head
/// actor's two units, the sequential trainer's whole model), in one order everywhere: finish the
/// data-parallel sync → the gradients' sum of squares (when `sumsq`) → the update of each unit
/// with `lr` → gather the parameters → zero the gradients. Returns the sum of squares over the
/// units, in their order (0 without `sumsq`). The one place a step is written.
pub fn step_units<B: Backend>(
    be: &B,
    opt: &Optimizer,
    scratch: &mut Scratch<B>,
    sync: &mut dyn StepSync<B>,
    units: &mut [&mut ParamSet<B>],
    lr: f32,
    sumsq: bool,
) -> f64 {
    sync.finish(be, &units.iter().map(|u| &**u).collect::<Vec<_>>());
    let mut ss = 0.0;
    if sumsq {
        for u in units.iter() {
            ss += grad_sumsq(be, u, scratch);
        }
    }
    for u in units.iter_mut() {
        opt.step(be, u, scratch, lr);
    }
    let sets: Vec<&ParamSet<B>> = units.iter().map(|u| &**u).collect();
    sync.gather(be, &sets);
    for u in sets {
        u.zero_grad(be);
    }
    ss
}

pub fn grad_sumsq<B: Backend>(be: &B, set: &ParamSet<B>, scratch: &mut Scratch<B>) -> f64 {
    scratch.sumsq(be, B::whole(&set.grads))
}
