//! What every block kind provides, as two traits: [`KindSpec`] (the kind's facts and tables,
//! backend-free: its tensors, which of them are norm gains and residual outputs, its embedding
//! and final norm, its parameter and memory counts, its host decoder) and [`BlockBody`] (its
//! forward and backward on a backend). Generic code asks these; it never branches on the kind.
//! The registry ([`kinds`](super)) maps each `model.arch` to its kind.

use crate::backend::pool::ActPool;
use crate::backend::Backend;
use crate::model::dims::{Arch, Dims};
use crate::model::moe::Mlp;
use crate::params::{Layout, ParamSet};

/// The norm a kind uses (in its blocks and as the head's final norm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// LayerNorm with gain and bias (ε = 1e-5).
    LayerNorm,
    /// RMSNorm with a gain (ε = `Dims::norm_eps`).
    RmsNorm,
}

/// How a kind knows positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// A learned table `wpe` (maxT, C) added to the token embedding.
    Learned,
    /// Rotary positions applied to q and k inside the block (no table).
    Rotary,
}

/// A model's sizes in f64 for the memory estimate (absurd configs must not overflow): C, NH,
/// KV, the dense MLP's hidden units F, and the mixture (E, k, S, F_e) when there is one.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub c: f64,
    pub nh: f64,
    pub kv: f64,
    pub ff: f64,
    pub moe: Option<(f64, f64, f64, f64)>,
}

/// One layer's keys and values of the positions decoded so far: (T, KV·hd) each.
pub struct KvSlot<'a> {
    pub k: &'a mut Vec<f32>,
    pub v: &'a mut Vec<f32>,
}

/// A block's weights on the host, resolved once, that decodes one position at a time.
pub trait HostBlock: Send + Sync {
    /// Add the block's two branches at position `pos` into `x` (C), appending this position's
    /// key and value to `kv`.
    fn step(&self, d: &Dims, x: &mut [f32], kv: KvSlot, pos: usize);
}

/// A block kind's facts and tables.
pub trait KindSpec: Sync {
    /// Its `model.arch`.
    fn arch(&self) -> Arch;
    /// The tensors of one block of `d` whose MLP is `mlp`, in buffer order.
    fn layout(&self, d: &Dims, mlp: Mlp) -> Layout;
    /// The norm gains (1 at init and in a `zero` block; every other vector starts at 0).
    fn gains(&self) -> &'static [&'static str];
    /// The residual output projections of a dense block (and their biases): the tensors whose
    /// init scales with depth and which `copying_zero` zeroes, making a block the identity.
    fn residual_outputs(&self) -> &'static [&'static str];
    /// Whether tensor `name` of a block is a residual output (an MoE block's include every
    /// expert's down matrix).
    fn is_residual_output(&self, name: &str) -> bool {
        self.residual_outputs().contains(&name)
    }
    fn norm(&self) -> Norm;
    fn positions(&self) -> Positions;
    /// Whether the LM head is `wte` unless `model.tie_embeddings` says otherwise.
    fn tied_by_default(&self) -> bool;
    /// The `[model]` keys of the LLaMA family this kind takes (`kv_heads`, `ffn_hidden`,
    /// `rope_theta`, `norm_eps`, `[model.moe]`); a config setting another is refused.
    fn takes_key(&self, key: &str) -> bool;
    /// The shape of a model of this kind before the config's optional keys apply.
    fn base_dims(&self, vocab: usize, max_seq: usize, channels: usize, heads: usize) -> Dims;
    /// A shape this kind cannot build, said (config validation says it first).
    fn check(&self, d: &Dims) -> Result<(), String>;
    /// Parameters of one block outside its MLP (norms, attention).
    fn attention_params(&self, d: &Dims) -> u64;
    /// Parameters of one block's dense MLP.
    fn mlp_params(&self, d: &Dims) -> u64;
    /// Per block: its parameters, and the floats one micro-batch stashes per token (the memory
    /// estimate, `config::memory`).
    fn memory(&self, s: &Sizes) -> (f64, f64);
    /// A block's host decoder over its weights `params` (of [`KindSpec::layout`]).
    fn host_block(&self, d: &Dims, params: Vec<f32>, mlp: Mlp) -> Box<dyn HostBlock>;
}

/// A block's forward and backward on a backend, with its stashes (per micro-batch) and scratch.
pub trait BlockBody<B: Backend>: Send {
    /// y = block(x) for micro-batch `mb`; x is kept for backward, y comes from the pool.
    fn forward(&mut self, be: &B, p: &ParamSet<B>, d: &Dims, mb: u64, x: B::Buf, b: usize, t: usize) -> B::Buf;
    /// dx = d block / dx · dy for micro-batch `mb`; parameter gradients accumulate. `dy` is
    /// updated in place and returned as dx.
    fn backward(&mut self, be: &B, p: &ParamSet<B>, d: &Dims, id: u64, mb: u64, dy: B::Buf) -> B::Buf;
    /// Drop micro-batch `mb`'s stash without a backward, recycling its memory.
    fn forget(&mut self, be: &B, mb: u64);
    /// Share `pool` instead of a private one.
    fn use_pool(&mut self, pool: ActPool<B>);
    /// Micro-batches stashed.
    fn in_flight(&self) -> usize;
    fn mlp(&self) -> Mlp {
        Mlp::Dense
    }
    /// After the optimizer's update: an MoE block's step load (and bias update); None if dense.
    fn after_update(&mut self, _be: &B, _p: &ParamSet<B>, _d: &Dims) -> Option<Vec<u64>> {
        None
    }
    /// The weighted auxiliary balancing loss of the last forward (0 without one).
    fn last_aux_loss(&self) -> f32 {
        0.0
    }
}
