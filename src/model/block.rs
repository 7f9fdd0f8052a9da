//! `Block`: one transformer layer of the model's kind (`Dims::arch`) — the unit a layer actor
//! owns, whatever the kind.
//!
//! The block owns its parameters ([`ParamSet`], tensors by name) and dispatches its forward and
//! backward to the kind's body: [`gpt2_block`](super::gpt2_block) (pre-LayerNorm, GELU, biases)
//! or [`llama_block`](super::llama_block) (pre-RMSNorm, rotary, grouped-query attention,
//! SwiGLU; `qwen3` adds QK-norm). Everything outside the block — the layer actor, growth,
//! checkpoints, the optimizer — sees only the parameter set and the tensor names this module's
//! tables give ([`gains`], [`residual_outputs`]).
//!
//! Activations are stashed per micro-batch id (`mb`) between forward and backward, so a pipeline
//! stage can hold several micro-batches in flight (1F1B); see [`stash`](super::stash).

use super::dims::{Arch, Dims};
use super::gpt2_block::Gpt2Body;
use super::init;
use super::llama_block::LlamaBody;
use super::moe::Mlp;
use crate::backend::pool::ActPool;
use crate::backend::Backend;
use crate::params::{Layout, ParamSet};

enum Body<B: Backend> {
    Gpt2(Gpt2Body<B>),
    Llama(LlamaBody<B>),
}

pub struct Block<B: Backend> {
    /// Stable layer id: birth order, used by logs, metrics and checkpoints.
    pub id: u64,
    pub w: ParamSet<B>,
    pub dims: Dims,
    body: Body<B>,
}

pub use super::dims::{gains, is_residual_output, residual_outputs};

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
        match d.arch {
            Arch::Gpt2 => Gpt2Body::<B>::layout(d),
            Arch::Llama | Arch::Qwen3 => LlamaBody::<B>::layout(d, mlp),
        }
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
        match &self.body {
            Body::Llama(l) => l.mlp,
            Body::Gpt2(_) => Mlp::Dense,
        }
    }

    /// A dense block with zeroed parameters (the caller fills them).
    pub fn new_empty(be: &B, dims: &Dims, id: u64) -> Self {
        Self::new_empty_mlp(be, dims, id, Mlp::Dense)
    }

    /// A block with zeroed parameters whose MLP is `mlp`.
    pub fn new_empty_mlp(be: &B, dims: &Dims, id: u64, mlp: Mlp) -> Self {
        assert!(mlp == Mlp::Dense || dims.moe.is_some(), "an MoE block needs the shape's [model.moe]");
        let body = match dims.arch {
            Arch::Gpt2 => Body::Gpt2(Gpt2Body::default()),
            Arch::Llama | Arch::Qwen3 => {
                assert!(
                    dims.heads.is_multiple_of(dims.kv_heads) && dims.head_size().is_multiple_of(2),
                    "{} block: heads {} must be a multiple of kv_heads {}, with an even head size (config validation says so first)",
                    dims.arch.name(),
                    dims.heads,
                    dims.kv_heads
                );
                Body::Llama(LlamaBody::new(mlp))
            }
        };
        Block { id, w: ParamSet::new(be, Self::layout_of(dims, mlp)), dims: dims.clone(), body }
    }

    /// A dense block initialised per `cfg` (its random stream is keyed by `id`).
    pub fn new_init(be: &B, dims: &Dims, id: u64, cfg: &init::InitConfig) -> Self {
        Self::new_init_mlp(be, dims, id, cfg, Mlp::Dense)
    }

    /// A block whose MLP is `mlp`, initialised per `cfg`.
    pub fn new_init_mlp(be: &B, dims: &Dims, id: u64, cfg: &init::InitConfig, mlp: Mlp) -> Self {
        let blk = Self::new_empty_mlp(be, dims, id, mlp);
        blk.w.params_from_host(be, &init::block_init(&blk.w.layout, dims.arch, cfg, id));
        blk
    }

    /// After this block's optimizer update: an MoE block records the step's expert load and,
    /// under `sigmoid` routing, moves its balancing bias (`model::moe`). Returns the load
    /// (tokens routed to each expert during the step), or None for a dense block.
    pub fn after_update(&mut self, be: &B) -> Option<Vec<u64>> {
        match &mut self.body {
            Body::Llama(l) => l.after_update(be, &self.w, &self.dims),
            Body::Gpt2(_) => None,
        }
    }

    /// y = block(x) for micro-batch `mb`; x is kept for backward, y comes from the pool.
    pub fn forward(&mut self, be: &B, mb: u64, x: B::Buf, b: usize, t: usize) -> B::Buf {
        match &mut self.body {
            Body::Gpt2(g) => g.forward(be, &self.w, &self.dims, mb, x, b, t),
            Body::Llama(l) => l.forward(be, &self.w, &self.dims, mb, x, b, t),
        }
    }

    /// dx = d block / dx · dy for micro-batch `mb`; parameter gradients accumulate.
    /// `dy` is updated in place and returned as dx.
    pub fn backward(&mut self, be: &B, mb: u64, dy: B::Buf) -> B::Buf {
        match &mut self.body {
            Body::Gpt2(g) => g.backward(be, &self.w, &self.dims, self.id, mb, dy),
            Body::Llama(l) => l.backward(be, &self.w, &self.dims, self.id, mb, dy),
        }
    }

    /// Drop micro-batch `mb`'s stash without a backward (evaluation), recycling its memory.
    pub fn forget(&mut self, be: &B, mb: u64) {
        match &mut self.body {
            Body::Gpt2(g) => g.stash.forget(be, mb),
            Body::Llama(l) => l.stash.forget(be, mb),
        }
    }

    /// Share `pool` (the device's pool, in the actor runtime) instead of a private one.
    pub fn use_pool(&mut self, pool: ActPool<B>) {
        match &mut self.body {
            Body::Gpt2(g) => g.stash.pool = pool,
            Body::Llama(l) => l.stash.pool = pool,
        }
    }

    /// The weighted auxiliary balancing loss of the last forward (`[model.moe] aux_loss`; 0 for
    /// a dense block or without one). Its gradient is part of the block's backward; the
    /// reported training loss is the LM loss alone.
    pub fn last_aux_loss(&self) -> f32 {
        match &self.body {
            Body::Llama(l) => l.last_aux,
            Body::Gpt2(_) => 0.0,
        }
    }

    /// Number of micro-batches stashed (in flight through this block).
    pub fn in_flight(&self) -> usize {
        match &self.body {
            Body::Gpt2(g) => g.stash.len(),
            Body::Llama(l) => l.stash.len(),
        }
    }
}
