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

/// The norm gains of a block of kind `arch`: 1 at init (the other vectors start at 0).
pub fn gains(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Gpt2 => &["ln1w", "ln2w"],
        Arch::Llama => &["attn_norm", "mlp_norm"],
        Arch::Qwen3 => &["attn_norm", "mlp_norm", "q_norm", "k_norm"],
    }
}

/// The residual output projections of a block of kind `arch` (and their biases): the tensors
/// whose init scales with depth and which `copying_zero` zeroes, making a block the identity.
pub fn residual_outputs(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Gpt2 => &["attprojw", "attprojb", "fcprojw", "fcprojb"],
        Arch::Llama | Arch::Qwen3 => &["ow", "downw"],
    }
}

impl<B: Backend> Block<B> {
    /// The tensors of a block of shape `d`, by name.
    pub fn layout(d: &Dims) -> Layout {
        match d.arch {
            Arch::Gpt2 => Gpt2Body::<B>::layout(d),
            Arch::Llama | Arch::Qwen3 => LlamaBody::<B>::layout(d),
        }
    }

    /// A block with zeroed parameters (the caller fills them).
    pub fn new_empty(be: &B, dims: &Dims, id: u64) -> Self {
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
                Body::Llama(LlamaBody::default())
            }
        };
        Block { id, w: ParamSet::new(be, Self::layout(dims)), dims: dims.clone(), body }
    }

    /// A block initialised per `cfg` (its random stream is keyed by `id`).
    pub fn new_init(be: &B, dims: &Dims, id: u64, cfg: &init::InitConfig) -> Self {
        let blk = Self::new_empty(be, dims, id);
        blk.w.params_from_host(be, &init::block_init(&blk.w.layout, dims.arch, cfg, id));
        blk
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

    /// Number of micro-batches stashed (in flight through this block).
    pub fn in_flight(&self) -> usize {
        match &self.body {
            Body::Gpt2(g) => g.stash.len(),
            Body::Llama(l) => l.stash.len(),
        }
    }
}
