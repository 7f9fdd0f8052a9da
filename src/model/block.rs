//! `Block`: one transformer layer of the model's kind (`Dims::arch`) — the unit a layer actor
//! owns, whatever the kind.
//!
//! The block owns its parameters ([`ParamSet`]: one buffer in its kind's layout) and its kind's
//! body ([`BlockBody`], from the registry [`kinds`]), which holds the typed handles of its
//! tensors and runs the forward and backward. Everything outside the block — the layer actor,
//! growth, checkpoints, the optimizer — sees only the parameter set and the kind's tables
//! ([`gains`], [`residual_outputs`]).
//!
//! Activations are stashed per micro-batch id (`mb`) between forward and backward, so a pipeline
//! stage can hold several micro-batches in flight (1F1B); see [`stash`](super::stash).

use super::dims::{Arch, Dims};
use super::init;
use super::kinds::{self, spec::BlockBody};
use super::moe::Mlp;
use crate::backend::pool::ActPool;
use crate::backend::Backend;
use crate::params::{Layout, ParamSet};

pub struct Block<B: Backend> {
    /// Stable layer id: birth order, used by logs, metrics and checkpoints.
    pub id: u64,
    pub w: ParamSet<B>,
    pub dims: Dims,
    body: Box<dyn BlockBody<B>>,
}

/// The norm gains of a block of kind `arch`: 1 at init (the other vectors start at 0).
pub fn gains(arch: Arch) -> &'static [&'static str] {
    kinds::spec(arch).gains()
}

/// The residual output projections of a dense block of kind `arch` (and their biases): the
/// tensors whose init scales with depth and which `copying_zero` zeroes, making a block the
/// identity. An MoE block's are `ow` and every expert's and the shared experts' down matrix
/// ([`is_residual_output`]).
pub fn residual_outputs(arch: Arch) -> &'static [&'static str] {
    kinds::spec(arch).residual_outputs()
}

/// Whether tensor `name` of a block of kind `arch` is a residual output projection (or its bias).
pub fn is_residual_output(arch: Arch, name: &str) -> bool {
    kinds::spec(arch).is_residual_output(name)
}

/// The MLP of a block born at `position` of a stack of `depth` blocks (after the birth) in a
/// model of `target` blocks, under `[model.moe]`'s `first_dense_layers`: dense when its
/// position in the final model is below it. Growth at the bottom (`top` false) pushes the
/// blocks above up, so a block's final position is its position at birth plus the blocks still
/// to come, target − depth; growth at the top leaves positions as they are. A model without
/// `[model.moe]` is dense throughout.
pub fn mlp_at_birth(d: &Dims, position: usize, depth: usize, target: usize, top: bool) -> Mlp {
    let Some(m) = &d.moe else { return Mlp::Dense };
    let last = if top { position } else { position + target.saturating_sub(depth) };
    if last < m.first_dense {
        Mlp::Dense
    } else {
        Mlp::Moe
    }
}

impl<B: Backend> Block<B> {
    /// The tensors of a dense block of shape `d`, by name.
    pub fn layout(d: &Dims) -> Layout {
        Self::layout_of(d, Mlp::Dense)
    }

    /// The tensors of a block of shape `d` whose MLP is `mlp`.
    pub fn layout_of(d: &Dims, mlp: Mlp) -> Layout {
        kinds::spec(d.arch).layout(d, mlp)
    }

    /// The MLP kind of a block of `d` holding `len` parameters (None: no block of `d` has that
    /// many). Dense and MoE blocks always differ in size: an MoE block has a router.
    pub fn mlp_of_len(d: &Dims, len: usize) -> Option<Mlp> {
        if len == Self::layout(d).total {
            Some(Mlp::Dense)
        } else if d.moe.is_some() && len == Self::layout_of(d, Mlp::Moe).total {
            Some(Mlp::Moe)
        } else {
            None
        }
    }

    /// This block's MLP kind.
    pub fn mlp(&self) -> Mlp {
        self.body.mlp()
    }

    /// A dense block with zeroed parameters (the caller fills them).
    pub fn new_empty(be: &B, dims: &Dims, id: u64) -> Self {
        Self::new_empty_mlp(be, dims, id, Mlp::Dense)
    }

    /// A block with zeroed parameters whose MLP is `mlp`.
    pub fn new_empty_mlp(be: &B, dims: &Dims, id: u64, mlp: Mlp) -> Self {
        assert!(mlp == Mlp::Dense || dims.moe.is_some(), "an MoE block needs the shape's [model.moe]");
        if let Err(e) = kinds::spec(dims.arch).check(dims) {
            panic!("{e} (config validation says so first)");
        }
        let body = kinds::body::<B>(dims, mlp);
        Block { id, w: ParamSet::new(be, Self::layout_of(dims, mlp)), dims: dims.clone(), body }
    }

    /// A dense block initialised per `cfg` (its random stream is keyed by `id`).
    pub fn new_init(be: &B, dims: &Dims, id: u64, cfg: &init::InitConfig) -> Self {
        Self::new_init_mlp(be, dims, id, cfg, Mlp::Dense)
    }

    /// A block whose MLP is `mlp`, initialised per `cfg`.
    pub fn new_init_mlp(be: &B, dims: &Dims, id: u64, cfg: &init::InitConfig, mlp: Mlp) -> Self {
        let blk = Self::new_empty_mlp(be, dims, id, mlp);
        blk.w.params_from_host(be, &init::block_init(&blk.w.layout, kinds::spec(dims.arch), cfg, id));
        blk
    }

    /// After this block's optimizer update: an MoE block records the step's expert load and,
    /// under `sigmoid` routing, moves its balancing bias (`model::moe`). Returns the load
    /// (tokens routed to each expert during the step), or None for a dense block.
    pub fn after_update(&mut self, be: &B) -> Option<Vec<u64>> {
        self.body.after_update(be, &self.w, &self.dims)
    }

    /// y = block(x) for micro-batch `mb`; x is kept for backward, y comes from the pool.
    pub fn forward(&mut self, be: &B, mb: u64, x: B::Buf, b: usize, t: usize) -> B::Buf {
        self.body.forward(be, &self.w, &self.dims, mb, x, b, t)
    }

    /// dx = d block / dx · dy for micro-batch `mb`; parameter gradients accumulate.
    /// `dy` is updated in place and returned as dx.
    pub fn backward(&mut self, be: &B, mb: u64, dy: B::Buf) -> B::Buf {
        self.body.backward(be, &self.w, &self.dims, self.id, mb, dy)
    }

    /// Drop micro-batch `mb`'s stash without a backward (evaluation), recycling its memory.
    pub fn forget(&mut self, be: &B, mb: u64) {
        self.body.forget(be, mb)
    }

    /// Share `pool` (the device's pool, in the actor runtime) instead of a private one.
    pub fn use_pool(&mut self, pool: ActPool<B>) {
        self.body.use_pool(pool)
    }

    /// The weighted auxiliary balancing loss of the last forward (`[model.moe] aux_loss`; 0 for
    /// a dense block or without one). Its gradient is part of the block's backward; the
    /// reported training loss is the LM loss alone.
    pub fn last_aux_loss(&self) -> f32 {
        self.body.last_aux_loss()
    }

    /// Number of micro-batches stashed (in flight through this block).
    pub fn in_flight(&self) -> usize {
        self.body.in_flight()
    }
}
