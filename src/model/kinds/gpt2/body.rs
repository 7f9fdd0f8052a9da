//! The GPT-2 block's forward and backward: pre-LayerNorm, multi-head attention, GELU MLP, biases.
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
//! Backward accumulates into the upstream gradient buffer IN PLACE (dy becomes dres2, then dx),
//! as llm.c does with its residual gradient: the buffer handed down is the one handed in.

use super::Gpt2Tensors;
use crate::backend::pool::ActPool;
use crate::backend::{Backend, View};
use crate::model::dims::Dims;
use crate::model::kinds::spec::BlockBody;
use crate::model::residual;
use crate::model::stash::{alloc_attention, Acts, Stashes};
use crate::params::ParamSet;

/// What one micro-batch's forward leaves for its backward. Shapes for N = B*T rows.
pub struct Gpt2Acts<B: Backend> {
    shape: (usize, usize),
    ln1: B::Buf,      // (N, C)
    ln1_mean: B::Buf, // (N)
    ln1_rstd: B::Buf, // (N)
    qkv: B::Buf,      // (N, 3C)
    atty: B::Buf,     // (N, C) attention output before the projection
    att: B::Buf,      // (B, NH, T, T) attention probabilities, or (B, NH, T) logsumexps (flash)
    res2: B::Buf,     // (N, C) x + attention branch
    ln2: B::Buf,      // (N, C)
    ln2_mean: B::Buf, // (N)
    ln2_rstd: B::Buf, // (N)
    fch: B::Buf,      // (N, 4C)
    fch_gelu: B::Buf, // (N, 4C)
}

impl<B: Backend> Acts for Gpt2Acts<B> {
    fn shape(&self) -> (usize, usize) {
        self.shape
    }
}

impl<B: Backend> Gpt2Acts<B> {
    fn new(be: &B, d: &Dims, b: usize, t: usize) -> Self {
        let (n, c) = (b * t, d.channels);
        Gpt2Acts {
            shape: (b, t),
            ln1: be.alloc_act(n * c),
            ln1_mean: be.alloc(n),
            ln1_rstd: be.alloc(n),
            qkv: be.alloc_act(n * 3 * c),
            atty: be.alloc_act(n * c),
            att: alloc_attention(be, be.attention_state_len(b, t, d.heads)),
            res2: be.alloc_act(n * c),
            ln2: be.alloc_act(n * c),
            ln2_mean: be.alloc(n),
            ln2_rstd: be.alloc(n),
            fch: be.alloc_act(n * 4 * c),
            fch_gelu: be.alloc_act(n * 4 * c),
        }
    }
}

/// Backward scratch, one set per block (a layer actor runs one backward at a time).
struct Gpt2Scratch<B: Backend> {
    shape: (usize, usize),
    dc: B::Buf,              // (N, C) dln2, then datty, then dln1
    dqkv: B::Buf,            // (N, 3C)
    datt: B::Buf,            // (B, NH, T, T), or (B, NH, T) (flash)
    dfch: B::Buf,            // (N, 4C)
    dfch_gelu: B::Buf,       // (N, 4C)
    dbranch: Option<B::Buf>, // (N, C) α·dy, the gradient of a branch output (only when α ≠ 1)
}

impl<B: Backend> Gpt2Scratch<B> {
    fn new(be: &B, d: &Dims, b: usize, t: usize) -> Self {
        let (n, c) = (b * t, d.channels);
        Gpt2Scratch {
            shape: (b, t),
            dc: be.alloc_act(n * c),
            dqkv: be.alloc_act(n * 3 * c),
            datt: alloc_attention(be, be.attention_scratch_len(b, t, d.heads)),
            dfch: be.alloc_act(n * 4 * c),
            dfch_gelu: be.alloc_act(n * 4 * c),
            dbranch: (d.residual != 1.0).then(|| be.alloc_act(n * c)),
        }
    }
}

/// The GPT-2 block's working state: its tensors, its stashes and its backward scratch.
pub struct Gpt2Body<B: Backend> {
    w: Gpt2Tensors,
    stash: Stashes<B, Gpt2Acts<B>>,
    scratch: Option<Gpt2Scratch<B>>,
}

fn w<B: Backend>(buf: &B::Buf) -> View<'_, B::Buf> {
    B::whole(buf)
}

impl<B: Backend> Gpt2Body<B> {
    pub fn new(w: Gpt2Tensors) -> Self {
        Gpt2Body { w, stash: Stashes::default(), scratch: None }
    }
}

impl<B: Backend> BlockBody<B> for Gpt2Body<B> {
    /// y = block(x) for micro-batch `mb`; x is kept for backward, y comes from the pool.
    fn forward(&mut self, be: &B, p: &ParamSet<B>, d: &Dims, mb: u64, x: B::Buf, b: usize, t: usize) -> B::Buf {
        let (n, c, nh) = (b * t, d.channels, d.heads);
        let wt = self.w;
        let a = self.stash.take(b, t, || Gpt2Acts::new(be, d, b, t));
        let y = self.stash.pool.take(be, n * c);
        let xv = w::<B>(&x);
        be.layernorm_forward(w::<B>(&a.ln1), w::<B>(&a.ln1_mean), w::<B>(&a.ln1_rstd), xv, p.p(wt.ln1w), p.p(wt.ln1b), n, c);
        be.matmul_forward(w::<B>(&a.qkv), w::<B>(&a.ln1), p.p(wt.qkvw), Some(p.p(wt.qkvb)), n, c, 3 * c);
        be.attention_forward(w::<B>(&a.atty), w::<B>(&a.att), w::<B>(&a.qkv), b, t, c, nh);
        let alpha = d.residual;
        // The projection lands in y (free until the very end), then res2 = x + α·y and its norm.
        be.matmul_forward(w::<B>(&y), w::<B>(&a.atty), p.p(wt.attprojw), Some(p.p(wt.attprojb)), n, c, c);
        let (ln2, mean, rstd) = (w::<B>(&a.ln2), w::<B>(&a.ln2_mean), w::<B>(&a.ln2_rstd));
        be.residual_layernorm_forward(w::<B>(&a.res2), ln2, mean, rstd, xv, w::<B>(&y), alpha, p.p(wt.ln2w), p.p(wt.ln2b), n, c);
        be.matmul_forward_gelu(w::<B>(&a.fch_gelu), w::<B>(&a.fch), w::<B>(&a.ln2), p.p(wt.fcw), Some(p.p(wt.fcb)), n, c, 4 * c);
        be.matmul_forward(w::<B>(&y), w::<B>(&a.fch_gelu), p.p(wt.fcprojw), Some(p.p(wt.fcprojb)), n, 4 * c, c);
        residual::add_onto_branch(be, w::<B>(&y), w::<B>(&a.res2), alpha);
        self.stash.keep(be, mb, a, x);
        y
    }

    /// dx = d block / dx · dy for micro-batch `mb`; parameter gradients accumulate.
    /// `dy` is updated in place and returned as dx.
    fn backward(&mut self, be: &B, p: &ParamSet<B>, dims: &Dims, id: u64, mb: u64, dy: B::Buf) -> B::Buf {
        let (a, x) = self.stash.remove(mb).unwrap_or_else(|| panic!("layer {id}: backward for micro-batch {mb} without a forward"));
        let (b, t) = a.shape;
        let (n, c, nh) = (b * t, dims.channels, dims.heads);
        let wt = self.w;
        if self.scratch.as_ref().map(|s| s.shape) != Some((b, t)) {
            self.scratch = Some(Gpt2Scratch::new(be, dims, b, t));
        }
        let s = self.scratch.as_ref().expect("scratch just set");
        let d = w::<B>(&dy);
        // The gradient of a branch's output: dy itself, or α·dy in `dbranch` when α ≠ 1.
        let alpha = dims.residual;
        let branch = || residual::branch_grad(be, s.dbranch.as_ref(), d, alpha);
        // MLP branch: y = res2 + α·fcproj(gelu(fc(ln2(res2))))
        be.matmul_backward_gelu(
            w::<B>(&s.dfch),
            w::<B>(&s.dfch_gelu),
            p.g(wt.fcprojw),
            Some(p.g(wt.fcprojb)),
            branch(),
            w::<B>(&a.fch_gelu),
            p.p(wt.fcprojw),
            w::<B>(&a.fch),
            n,
            4 * c,
            c,
        );
        be.matmul_backward(Some(w::<B>(&s.dc)), p.g(wt.fcw), Some(p.g(wt.fcb)), w::<B>(&s.dfch), w::<B>(&a.ln2), p.p(wt.fcw), n, c, 4 * c);
        // dy += ln2 backward: dy now holds dres2 (residual path plus MLP path)
        be.layernorm_backward(
            d,
            p.g(wt.ln2w),
            p.g(wt.ln2b),
            w::<B>(&s.dc),
            w::<B>(&a.res2),
            p.p(wt.ln2w),
            w::<B>(&a.ln2_mean),
            w::<B>(&a.ln2_rstd),
            n,
            c,
        );
        // Attention branch: res2 = x + α·attproj(attn(qkv(ln1(x))))
        be.matmul_backward(
            Some(w::<B>(&s.dc)),
            p.g(wt.attprojw),
            Some(p.g(wt.attprojb)),
            branch(),
            w::<B>(&a.atty),
            p.p(wt.attprojw),
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
        be.matmul_backward(
            Some(w::<B>(&s.dc)),
            p.g(wt.qkvw),
            Some(p.g(wt.qkvb)),
            w::<B>(&s.dqkv),
            w::<B>(&a.ln1),
            p.p(wt.qkvw),
            n,
            c,
            3 * c,
        );
        // dy += ln1 backward: dy now holds dx
        be.layernorm_backward(
            d,
            p.g(wt.ln1w),
            p.g(wt.ln1b),
            w::<B>(&s.dc),
            w::<B>(&x),
            p.p(wt.ln1w),
            w::<B>(&a.ln1_mean),
            w::<B>(&a.ln1_rstd),
            n,
            c,
        );
        self.stash.recycle(be, a, x);
        dy
    }

    fn forget(&mut self, be: &B, mb: u64) {
        self.stash.forget(be, mb)
    }

    fn use_pool(&mut self, pool: ActPool<B>) {
        self.stash.pool = pool;
    }

    fn in_flight(&self) -> usize {
        self.stash.len()
    }
}
