//! `Block`: one pre-LN GPT-2 transformer layer — the unit a layer actor owns.
//!
//! ```text
//! x ─► ln1 ─► qkv = ln1 @ Wqkv^T + b ─► causal attention ─► @ Wproj^T + b ─► ·α + x = res2
//! res2 ─► ln2 ─► fch = ln2 @ Wfc^T + b ─► gelu ─► @ Wfcproj^T + b ─► ·α + res2 = y
//! ```
//!
//! α is the residual-branch multiplier (`Dims::residual`): 1 under the standard
//! parameterisation (the multiply is skipped, so that path is GPT-2's exactly), 1/sqrt(L) under
//! `depth_mup`.
//!
//! Activations are stashed per micro-batch id (`mb`) between forward and backward, so a pipeline
//! stage can hold several micro-batches in flight (1F1B). Stashes and backward scratch are
//! allocated once per shape and recycled; the (N, C) buffers handed between stages circulate
//! through the unit's [`ActPool`](super::ActPool): the input of a forward is kept in the stash,
//! the output is taken from the pool, and after backward the input goes back to the pool.
//!
//! Backward accumulates into the upstream gradient buffer IN PLACE (dy becomes dres2, then dx),
//! as llm.c does with its residual gradient: the buffer handed down is the one handed in.

use super::dims::Dims;
use super::init;
use crate::backend::pool::ActPool;
use crate::backend::{Backend, View};
use crate::params::{Layout, ParamSet};
use std::collections::HashMap;

/// What one micro-batch's forward leaves for its backward. Shapes for N = B*T rows.
pub struct BlockActs<B: Backend> {
    shape: (usize, usize),
    input: Option<B::Buf>, // (N, C) the block's input x
    ln1: B::Buf,           // (N, C)
    ln1_mean: B::Buf,      // (N)
    ln1_rstd: B::Buf,      // (N)
    qkv: B::Buf,           // (N, 3C)
    atty: B::Buf,          // (N, C) attention output before the projection
    att: B::Buf,           // (B, NH, T, T) attention probabilities, or (B, NH, T) logsumexps (flash)
    res2: B::Buf,          // (N, C) x + attention branch
    ln2: B::Buf,           // (N, C)
    ln2_mean: B::Buf,      // (N)
    ln2_rstd: B::Buf,      // (N)
    fch: B::Buf,           // (N, 4C)
    fch_gelu: B::Buf,      // (N, 4C)
}

impl<B: Backend> BlockActs<B> {
    fn new(be: &B, d: &Dims, b: usize, t: usize) -> Self {
        let (n, c) = (b * t, d.channels);
        BlockActs {
            shape: (b, t),
            input: None,
            ln1: be.alloc(n * c),
            ln1_mean: be.alloc(n),
            ln1_rstd: be.alloc(n),
            qkv: be.alloc(n * 3 * c),
            atty: be.alloc(n * c),
            att: be.alloc(be.attention_state_len(b, t, d.heads)),
            res2: be.alloc(n * c),
            ln2: be.alloc(n * c),
            ln2_mean: be.alloc(n),
            ln2_rstd: be.alloc(n),
            fch: be.alloc(n * 4 * c),
            fch_gelu: be.alloc(n * 4 * c),
        }
    }
}

/// Backward scratch, one set per block (a stage runs one backward at a time).
struct BlockScratch<B: Backend> {
    shape: (usize, usize),
    dc: B::Buf,              // (N, C) dln2, then datty, then dln1
    dqkv: B::Buf,            // (N, 3C)
    datt: B::Buf,            // (B, NH, T, T), or (B, NH, T) (flash)
    dfch: B::Buf,            // (N, 4C)
    dfch_gelu: B::Buf,       // (N, 4C)
    dbranch: Option<B::Buf>, // (N, C) α·dy, the gradient of a branch output (only when α ≠ 1)
}

impl<B: Backend> BlockScratch<B> {
    fn new(be: &B, d: &Dims, b: usize, t: usize) -> Self {
        let (n, c) = (b * t, d.channels);
        BlockScratch {
            shape: (b, t),
            dc: be.alloc(n * c),
            dqkv: be.alloc(n * 3 * c),
            datt: be.alloc(be.attention_scratch_len(b, t, d.heads)),
            dfch: be.alloc(n * 4 * c),
            dfch_gelu: be.alloc(n * 4 * c),
            dbranch: (d.residual != 1.0).then(|| be.alloc(n * c)),
        }
    }
}

pub struct Block<B: Backend> {
    /// Stable layer id: birth order, used by logs, metrics and checkpoints.
    pub id: u64,
    pub w: ParamSet<B>,
    pub dims: Dims,
    stash: HashMap<u64, BlockActs<B>>,
    spare: Vec<BlockActs<B>>,
    scratch: Option<BlockScratch<B>>,
    pool: ActPool<B>,
}

fn w<B: Backend>(buf: &B::Buf) -> View<'_, B::Buf> {
    B::whole(buf)
}

impl<B: Backend> Block<B> {
    pub fn layout(d: &Dims) -> Layout {
        let c = d.channels;
        Layout::new(&[
            ("ln1w", vec![c]),
            ("ln1b", vec![c]),
            ("qkvw", vec![3 * c, c]),
            ("qkvb", vec![3 * c]),
            ("attprojw", vec![c, c]),
            ("attprojb", vec![c]),
            ("ln2w", vec![c]),
            ("ln2b", vec![c]),
            ("fcw", vec![4 * c, c]),
            ("fcb", vec![4 * c]),
            ("fcprojw", vec![c, 4 * c]),
            ("fcprojb", vec![c]),
        ])
    }

    /// A block with zeroed parameters (the caller fills them).
    pub fn new_empty(be: &B, dims: &Dims, id: u64) -> Self {
        Block {
            id,
            w: ParamSet::new(be, Self::layout(dims)),
            dims: dims.clone(),
            stash: HashMap::new(),
            spare: Vec::new(),
            scratch: None,
            pool: ActPool::default(),
        }
    }

    /// A block initialised per `cfg` (its random stream is keyed by `id`).
    pub fn new_init(be: &B, dims: &Dims, id: u64, cfg: &init::InitConfig) -> Self {
        let blk = Self::new_empty(be, dims, id);
        blk.w.params_from_host(be, &init::block_init(&blk.w.layout, cfg, id));
        blk
    }

    fn acts(&mut self, be: &B, b: usize, t: usize) -> BlockActs<B> {
        match self.spare.iter().position(|a| a.shape == (b, t)) {
            Some(i) => self.spare.swap_remove(i),
            None => BlockActs::new(be, &self.dims, b, t),
        }
    }

    /// y = block(x) for micro-batch `mb`; x is kept for backward, y comes from the pool.
    pub fn forward(&mut self, be: &B, mb: u64, x: B::Buf, b: usize, t: usize) -> B::Buf {
        let (n, c, nh) = (b * t, self.dims.channels, self.dims.heads);
        let a = self.acts(be, b, t);
        let y = self.pool.take(be, n * c);
        let p = &self.w;
        let xv = w::<B>(&x);
        be.layernorm_forward(w::<B>(&a.ln1), w::<B>(&a.ln1_mean), w::<B>(&a.ln1_rstd), xv, p.p("ln1w"), p.p("ln1b"), n, c);
        be.matmul_forward(w::<B>(&a.qkv), w::<B>(&a.ln1), p.p("qkvw"), Some(p.p("qkvb")), n, c, 3 * c);
        be.attention_forward(w::<B>(&a.atty), w::<B>(&a.att), w::<B>(&a.qkv), b, t, c, nh);
        let alpha = self.dims.residual;
        // The projection lands in y (free until the very end), then res2 = x + α·y.
        be.matmul_forward(w::<B>(&y), w::<B>(&a.atty), p.p("attprojw"), Some(p.p("attprojb")), n, c, c);
        if alpha == 1.0 {
            be.add(w::<B>(&a.res2), xv, w::<B>(&y));
        } else {
            be.copy(w::<B>(&a.res2), xv);
            be.axpby(w::<B>(&a.res2), 1.0, alpha, w::<B>(&y));
        }
        be.layernorm_forward(w::<B>(&a.ln2), w::<B>(&a.ln2_mean), w::<B>(&a.ln2_rstd), w::<B>(&a.res2), p.p("ln2w"), p.p("ln2b"), n, c);
        be.matmul_forward(w::<B>(&a.fch), w::<B>(&a.ln2), p.p("fcw"), Some(p.p("fcb")), n, c, 4 * c);
        be.gelu_forward(w::<B>(&a.fch_gelu), w::<B>(&a.fch));
        be.matmul_forward(w::<B>(&y), w::<B>(&a.fch_gelu), p.p("fcprojw"), Some(p.p("fcprojb")), n, 4 * c, c);
        if alpha == 1.0 {
            be.add_assign(w::<B>(&y), w::<B>(&a.res2));
        } else {
            be.axpby(w::<B>(&y), alpha, 1.0, w::<B>(&a.res2));
        }
        let mut a = a;
        a.input = Some(x);
        if let Some(old) = self.stash.insert(mb, a) {
            // A micro-batch id reused before its backward: keep the memory, drop nothing.
            self.recycle(be, old);
        }
        y
    }

    fn recycle(&mut self, be: &B, mut a: BlockActs<B>) {
        if let Some(x) = a.input.take() {
            self.pool.put(be, x);
        }
        self.spare.push(a);
    }

    /// Drop micro-batch `mb`'s stash without a backward (evaluation), recycling its memory.
    pub fn forget(&mut self, be: &B, mb: u64) {
        if let Some(a) = self.stash.remove(&mb) {
            self.recycle(be, a);
        }
    }

    /// Share `pool` (the device's pool, in the actor runtime) instead of a private one.
    pub fn use_pool(&mut self, pool: ActPool<B>) {
        self.pool = pool;
    }

    /// Number of micro-batches stashed (in flight through this block).
    pub fn in_flight(&self) -> usize {
        self.stash.len()
    }

    /// dx = d block / dx · dy for micro-batch `mb`; parameter gradients accumulate.
    /// `dy` is updated in place and returned as dx.
    pub fn backward(&mut self, be: &B, mb: u64, dy: B::Buf) -> B::Buf {
        let a = self.stash.remove(&mb).unwrap_or_else(|| panic!("layer {}: backward for micro-batch {mb} without a forward", self.id));
        let (b, t) = a.shape;
        let (n, c, nh) = (b * t, self.dims.channels, self.dims.heads);
        if self.scratch.as_ref().map(|s| s.shape) != Some((b, t)) {
            self.scratch = Some(BlockScratch::new(be, &self.dims, b, t));
        }
        let s = self.scratch.as_ref().expect("scratch just set");
        let p = &self.w;
        let d = w::<B>(&dy);
        let x = a.input.as_ref().expect("stash holds its input");
        // The gradient of a branch's output: dy itself, or α·dy in `dbranch` when α ≠ 1.
        let alpha = self.dims.residual;
        let branch = || match &s.dbranch {
            None => w::<B>(&dy),
            Some(g) => {
                be.copy(w::<B>(g), w::<B>(&dy));
                be.axpby(w::<B>(g), alpha, 0.0, w::<B>(&dy));
                w::<B>(g)
            }
        };
        // MLP branch: y = res2 + α·fcproj(gelu(fc(ln2(res2))))
        be.matmul_backward(
            Some(w::<B>(&s.dfch_gelu)),
            p.g("fcprojw"),
            Some(p.g("fcprojb")),
            branch(),
            w::<B>(&a.fch_gelu),
            p.p("fcprojw"),
            n,
            4 * c,
            c,
        );
        be.gelu_backward(w::<B>(&s.dfch), w::<B>(&a.fch), w::<B>(&s.dfch_gelu));
        be.matmul_backward(Some(w::<B>(&s.dc)), p.g("fcw"), Some(p.g("fcb")), w::<B>(&s.dfch), w::<B>(&a.ln2), p.p("fcw"), n, c, 4 * c);
        // dy += ln2 backward: dy now holds dres2 (residual path plus MLP path)
        be.layernorm_backward(
            d,
            p.g("ln2w"),
            p.g("ln2b"),
            w::<B>(&s.dc),
            w::<B>(&a.res2),
            p.p("ln2w"),
            w::<B>(&a.ln2_mean),
            w::<B>(&a.ln2_rstd),
            n,
            c,
        );
        // Attention branch: res2 = x + α·attproj(attn(qkv(ln1(x))))
        be.matmul_backward(
            Some(w::<B>(&s.dc)),
            p.g("attprojw"),
            Some(p.g("attprojb")),
            branch(),
            w::<B>(&a.atty),
            p.p("attprojw"),
            n,
            c,
            c,
        );
        be.attention_backward(
            w::<B>(&s.dqkv),
            w::<B>(&s.datt),
            w::<B>(&s.dc),
            w::<B>(&a.qkv),
            w::<B>(&a.atty),
            w::<B>(&a.att),
            b,
            t,
            c,
            nh,
        );
        be.matmul_backward(Some(w::<B>(&s.dc)), p.g("qkvw"), Some(p.g("qkvb")), w::<B>(&s.dqkv), w::<B>(&a.ln1), p.p("qkvw"), n, c, 3 * c);
        // dy += ln1 backward: dy now holds dx
        be.layernorm_backward(
            d,
            p.g("ln1w"),
            p.g("ln1b"),
            w::<B>(&s.dc),
            w::<B>(x),
            p.p("ln1w"),
            w::<B>(&a.ln1_mean),
            w::<B>(&a.ln1_rstd),
            n,
            c,
        );
        self.recycle(be, a);
        dy
    }
}
