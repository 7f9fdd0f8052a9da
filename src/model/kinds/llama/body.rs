//! The LLaMA-family block's forward and backward (`llama`, and `qwen3` = llama + QK-norm).
//!
//! ```text
//! x ─► rms1 ─► qkv = rms1 @ Wqkv^T ─► [qwen3: RMSNorm on each q and k head] ─► rotary(q, k) ─►
//!      share k, v over head groups ─► causal attention ─► @ Wo^T ─► ·α + x = res2
//! res2 ─► rms2 ─► [gate | up] = rms2 @ Wgu^T ─► silu(gate)·up ─► @ Wdown^T ─► ·α + res2 = y
//! ```
//!
//! No biases; grouped-query attention (`kv_heads` key/value heads shared by `heads / kv_heads`
//! query heads each); SwiGLU with `ffn_hidden` units. Fused tensors keep the products few:
//! `qkvw` is q_proj, k_proj and v_proj stacked (rows (NH + 2·KV)·hd), `gate_upw` is gate_proj
//! and up_proj stacked (rows 2F); an export splits them into the Hugging Face names. α is the
//! residual-branch multiplier, as in the GPT-2 block. Shapes are for N = B·T rows.

use super::moe::{self as moe_mlp, MoeActs, MoeScratch};
use super::{qkv_width, LlamaTensors, MlpTensors};
use crate::backend::pool::ActPool;
use crate::backend::{Backend, View};
use crate::model::dims::Dims;
use crate::model::kinds::spec::BlockBody;
use crate::model::moe::{Mlp, Routing};
use crate::model::residual;
use crate::model::stash::{alloc_attention, Acts, Stashes};
use crate::params::ParamSet;

/// What one micro-batch's forward leaves for its backward.
pub struct LlamaActs<B: Backend> {
    shape: (usize, usize),
    rms1: B::Buf,            // (N, C)
    rstd1: B::Buf,           // (N)
    qkv_raw: Option<B::Buf>, // (N, (NH + 2KV)·hd) the projection before QK-norm (qwen3 only)
    rstd_q: Option<B::Buf>,  // (N·NH) (qwen3 only)
    rstd_k: Option<B::Buf>,  // (N·KV) (qwen3 only)
    qkv3: B::Buf,            // (N, 3·NH·hd) rotated q and k, keys and values repeated per query head
    att: B::Buf,             // attention state
    atty: B::Buf,            // (N, NH·hd)
    res2: B::Buf,            // (N, C)
    rms2: B::Buf,            // (N, C)
    rstd2: B::Buf,           // (N)
    gu: B::Buf,              // (N, 2F) (dense MLP; empty for MoE)
    h: B::Buf,               // (N, F) (dense MLP; empty for MoE)
    moe: Option<MoeActs<B>>, // the MoE MLP's
}

impl<B: Backend> Acts for LlamaActs<B> {
    fn shape(&self) -> (usize, usize) {
        self.shape
    }
}

impl<B: Backend> LlamaActs<B> {
    fn new(be: &B, d: &Dims, b: usize, t: usize, mlp: Mlp, qk: bool) -> Self {
        let (n, c, a) = (b * t, d.channels, d.heads * d.head_size());
        let moe = d.moe.as_ref().filter(|_| mlp == Mlp::Moe);
        let f = if moe.is_some() { 0 } else { d.ffn_hidden };
        LlamaActs {
            shape: (b, t),
            rms1: be.alloc_act(n * c),
            rstd1: be.alloc(n),
            qkv_raw: qk.then(|| be.alloc_act(n * qkv_width(d))),
            rstd_q: qk.then(|| be.alloc(n * d.heads)),
            rstd_k: qk.then(|| be.alloc(n * d.kv_heads)),
            qkv3: be.alloc_act(n * 3 * a),
            att: alloc_attention(be, be.attention_state_len(b, t, d.heads)),
            atty: be.alloc_act(n * a),
            res2: be.alloc_act(n * c),
            rms2: be.alloc_act(n * c),
            rstd2: be.alloc(n),
            gu: be.alloc_act(n * 2 * f),
            h: be.alloc_act(n * f),
            moe: moe.map(|m| MoeActs::new(be, d, m, n)),
        }
    }
}

/// Working buffers of one forward or backward, one set per block (a layer actor runs one at a time).
struct Scratch<B: Backend> {
    shape: (usize, usize),
    qkv: B::Buf,             // (N, (NH + 2KV)·hd): the projection (normed, rotated), then its gradient
    dh: B::Buf,              // (N, F)
    dgu: B::Buf,             // (N, 2F)
    dc: B::Buf,              // (N, C)
    datty: B::Buf,           // (N, NH·hd)
    dqkv3: B::Buf,           // (N, 3·NH·hd)
    datt: B::Buf,            // attention backward scratch
    dbranch: Option<B::Buf>, // (N, C) α·dy (only when α ≠ 1)
    moe: Option<MoeScratch<B>>,
}

impl<B: Backend> Scratch<B> {
    fn new(be: &B, d: &Dims, b: usize, t: usize, mlp: Mlp) -> Self {
        let (n, c, a) = (b * t, d.channels, d.heads * d.head_size());
        let moe = d.moe.as_ref().filter(|_| mlp == Mlp::Moe);
        let f = if moe.is_some() { 0 } else { d.ffn_hidden };
        Scratch {
            shape: (b, t),
            qkv: be.alloc_act(n * qkv_width(d)),
            dh: be.alloc_act(n * f),
            dgu: be.alloc_act(n * 2 * f),
            dc: be.alloc_act(n * c),
            datty: be.alloc_act(n * a),
            dqkv3: be.alloc_act(n * 3 * a),
            datt: alloc_attention(be, be.attention_scratch_len(b, t, d.heads)),
            dbranch: (d.residual != 1.0).then(|| be.alloc_act(n * c)),
            moe: moe.map(|m| MoeScratch::new(be, d, m, n)),
        }
    }
}

/// The LLaMA-family block's working state: its stashes and scratch, its MLP kind, and (MoE) the
/// tokens routed to each expert so far in the current step.
pub struct LlamaBody<B: Backend> {
    w: LlamaTensors,
    stash: Stashes<B, LlamaActs<B>>,
    scratch: Option<Scratch<B>>,
    mlp: Mlp,
    load: Vec<u64>,
    /// The weighted auxiliary balancing loss of the last forward (0 without one).
    last_aux: f32,
}

fn w<B: Backend>(buf: &B::Buf) -> View<'_, B::Buf> {
    B::whole(buf)
}

/// The q heads and the k heads of fused (N, qkv_width) rows, as two views.
fn q_and_k<'a, B: Backend>(buf: &'a B::Buf, d: &Dims) -> (View<'a, B::Buf>, View<'a, B::Buf>) {
    let v = B::whole(buf);
    let koff = d.heads * d.head_size();
    (v, v.sub(koff, v.len - koff))
}

impl<B: Backend> LlamaBody<B> {
    pub fn new(w: LlamaTensors) -> Self {
        let mlp = match w.mlp {
            MlpTensors::Dense { .. } => Mlp::Dense,
            MlpTensors::Moe(_) => Mlp::Moe,
        };
        LlamaBody { w, stash: Stashes::default(), scratch: None, mlp, load: Vec::new(), last_aux: 0.0 }
    }

    /// The scratch for micro-batches of (b, t), made on the first one of that shape.
    fn scratch(&mut self, be: &B, d: &Dims, b: usize, t: usize) {
        if self.scratch.as_ref().map(|s| s.shape) != Some((b, t)) {
            self.scratch = Some(Scratch::new(be, d, b, t, self.mlp));
        }
    }
}

impl<B: Backend> BlockBody<B> for LlamaBody<B> {
    fn mlp(&self) -> Mlp {
        self.mlp
    }

    fn last_aux_loss(&self) -> f32 {
        self.last_aux
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

    /// After the optimizer's update: the step's expert load, and under `sigmoid` routing the
    /// balancing bias moved by it (`model::moe::update_bias`). None for a dense block.
    fn after_update(&mut self, be: &B, p: &ParamSet<B>, d: &Dims) -> Option<Vec<u64>> {
        let m = d.moe.as_ref().filter(|_| self.mlp == Mlp::Moe)?;
        let MlpTensors::Moe(mt) = &self.w.mlp else { return None };
        let load = std::mem::replace(&mut self.load, vec![0; m.experts]);
        let load = if load.is_empty() { vec![0; m.experts] } else { load };
        if m.routing == Routing::Sigmoid && load.iter().any(|&l| l > 0) {
            let mut bias = vec![0.0f32; m.experts];
            let rb = mt.router_bias.expect("sigmoid routing has a balancing bias");
            be.download(p.p(rb), &mut bias);
            crate::model::moe::update_bias(&mut bias, &load, m.bias_rate);
            be.upload(p.p(rb), &bias);
        }
        Some(load)
    }

    /// y = block(x) for micro-batch `mb`; x is kept for backward, y comes from the pool.
    fn forward(&mut self, be: &B, p: &ParamSet<B>, d: &Dims, mb: u64, x: B::Buf, b: usize, t: usize) -> B::Buf {
        let (n, c, nh, kv, hd, f) = (b * t, d.channels, d.heads, d.kv_heads, d.head_size(), d.ffn_hidden);
        let (qw, a, alpha) = (qkv_width(d), nh * hd, d.residual);
        self.scratch(be, d, b, t);
        let (mlp, qk) = (self.mlp, self.w.qk_norm.is_some());
        let mut acts = self.stash.take(b, t, || LlamaActs::new(be, d, b, t, mlp, qk));
        let sc = self.scratch.as_ref().expect("made above");
        let wt = &self.w;
        let qkv = &sc.qkv;
        let y = self.stash.pool.take(be, n * c);
        let xv = w::<B>(&x);
        be.rmsnorm_forward(w::<B>(&acts.rms1), w::<B>(&acts.rstd1), xv, p.p(wt.attn_norm), n, c, d.norm_eps);
        if let (Some(raw), Some(rq), Some(rk), Some((qn, kn))) = (&acts.qkv_raw, &acts.rstd_q, &acts.rstd_k, wt.qk_norm) {
            // qwen3: the projection is kept raw for the backward; q and k heads are normed into
            // the working copy, v is copied as it is.
            be.matmul_forward(w::<B>(raw), w::<B>(&acts.rms1), p.p(wt.qkvw), None, n, c, qw);
            be.copy(w::<B>(qkv), w::<B>(raw));
            let ((oq, ok), (iq, ik)) = (q_and_k::<B>(qkv, d), q_and_k::<B>(raw, d));
            be.head_rmsnorm_forward(oq, w::<B>(rq), iq, p.p(qn), n, qw, nh, hd, d.norm_eps);
            be.head_rmsnorm_forward(ok, w::<B>(rk), ik, p.p(kn), n, qw, kv, hd, d.norm_eps);
        } else {
            be.matmul_forward(w::<B>(qkv), w::<B>(&acts.rms1), p.p(wt.qkvw), None, n, c, qw);
        }
        // Rotary positions on the q and k heads, then every query head gets its group's k, v.
        be.rope(w::<B>(qkv), n, t, qw, nh + kv, hd, d.rope_theta, false);
        be.gqa_expand(w::<B>(&acts.qkv3), w::<B>(qkv), n, nh, kv, hd);
        be.attention_forward(w::<B>(&acts.atty), w::<B>(&acts.att), w::<B>(&acts.qkv3), b, t, a, nh);
        // The projection lands in y (free until the very end), then res2 = x + α·y and its norm.
        be.matmul_forward(w::<B>(&y), w::<B>(&acts.atty), p.p(wt.ow), None, n, a, c);
        let (rms2, rstd2, eps) = (w::<B>(&acts.rms2), w::<B>(&acts.rstd2), d.norm_eps);
        be.residual_rmsnorm_forward(w::<B>(&acts.res2), rms2, rstd2, xv, w::<B>(&y), alpha, p.p(wt.mlp_norm), n, c, eps);
        match (&mut acts.moe, &d.moe, &wt.mlp) {
            (Some(ma), Some(m), MlpTensors::Moe(mt)) => {
                moe_mlp::forward(be, p, mt, d, m, ma, &acts.rms2, &y, &sc.dc, n);
                self.last_aux = ma.aux;
            }
            (_, _, MlpTensors::Moe(_)) => unreachable!("an MoE block's activations hold its mixture"),
            (_, _, &MlpTensors::Dense { gate_upw, downw }) => {
                be.matmul_forward(w::<B>(&acts.gu), w::<B>(&acts.rms2), p.p(gate_upw), None, n, c, 2 * f);
                be.swiglu_forward(w::<B>(&acts.h), w::<B>(&acts.gu), n, f);
                be.matmul_forward(w::<B>(&y), w::<B>(&acts.h), p.p(downw), None, n, f, c);
            }
        }
        residual::add_onto_branch(be, w::<B>(&y), w::<B>(&acts.res2), alpha);
        self.stash.keep(be, mb, acts, x);
        y
    }

    /// dx = d block / dx · dy for micro-batch `mb`; parameter gradients accumulate. `dy` is
    /// updated in place and returned as dx.
    fn backward(&mut self, be: &B, p: &ParamSet<B>, d: &Dims, id: u64, mb: u64, dy: B::Buf) -> B::Buf {
        let (a, x) = self.stash.remove(mb).unwrap_or_else(|| panic!("layer {id}: backward for micro-batch {mb} without a forward"));
        let (b, t) = a.shape;
        self.scratch(be, d, b, t);
        if let Some(ma) = &a.moe {
            // The tokens routed to each expert by the micro-batches trained this step.
            self.load.resize(d.moe.as_ref().map_or(0, |m| m.experts), 0);
            for &x in ma.experts() {
                self.load[x as usize] += 1;
            }
        }
        let s = self.scratch.as_mut().expect("made above");
        let wt = &self.w;
        let (n, c, nh, kv, hd, f) = (b * t, d.channels, d.heads, d.kv_heads, d.head_size(), d.ffn_hidden);
        let (qw, att_c, alpha) = (qkv_width(d), nh * hd, d.residual);
        let dyv = w::<B>(&dy);
        // The gradient of a branch's output: dy itself, or α·dy in `dbranch` when α ≠ 1.
        let branch = || residual::branch_grad(be, s.dbranch.as_ref(), dyv, alpha);
        // MLP branch: y = res2 + α·down(swiglu(gate_up(rms2(res2)))), or α·MoE(rms2(res2))
        match (&a.moe, &mut s.moe, &d.moe, &wt.mlp) {
            (Some(ma), Some(ms), Some(m), MlpTensors::Moe(mt)) => moe_mlp::backward(be, p, mt, d, m, ma, ms, &a.rms2, branch(), &s.dc, n),
            (_, _, _, MlpTensors::Moe(_)) => unreachable!("an MoE block's activations hold its mixture"),
            (_, _, _, &MlpTensors::Dense { gate_upw, downw }) => {
                be.matmul_backward(Some(w::<B>(&s.dh)), p.g(downw), None, branch(), w::<B>(&a.h), p.p(downw), n, f, c);
                be.swiglu_backward(w::<B>(&s.dgu), w::<B>(&a.gu), w::<B>(&s.dh), n, f);
                be.matmul_backward(Some(w::<B>(&s.dc)), p.g(gate_upw), None, w::<B>(&s.dgu), w::<B>(&a.rms2), p.p(gate_upw), n, c, 2 * f);
            }
        }
        // dy += rms2 backward: dy now holds dres2
        be.rmsnorm_backward(dyv, p.g(wt.mlp_norm), w::<B>(&s.dc), w::<B>(&a.res2), p.p(wt.mlp_norm), w::<B>(&a.rstd2), n, c);
        // Attention branch: res2 = x + α·o(attn(share(rotary(norm(qkv(rms1(x)))))))
        be.matmul_backward(Some(w::<B>(&s.datty)), p.g(wt.ow), None, branch(), w::<B>(&a.atty), p.p(wt.ow), n, att_c, c);
        be.attention_backward(
            w::<B>(&s.dqkv3),
            w::<B>(&s.datt),
            w::<B>(&s.datty),
            w::<B>(&a.qkv3),
            w::<B>(&a.atty),
            w::<B>(&a.att),
            b,
            t,
            att_c,
            nh,
        );
        be.gqa_reduce(w::<B>(&s.qkv), w::<B>(&s.dqkv3), n, nh, kv, hd);
        be.rope(w::<B>(&s.qkv), n, t, qw, nh + kv, hd, d.rope_theta, true);
        if let (Some(raw), Some(rq), Some(rk), Some((qn, kn))) = (&a.qkv_raw, &a.rstd_q, &a.rstd_k, wt.qk_norm) {
            let ((dq, dk), (iq, ik)) = (q_and_k::<B>(&s.qkv, d), q_and_k::<B>(raw, d));
            be.head_rmsnorm_backward(dq, p.g(qn), iq, p.p(qn), w::<B>(rq), n, qw, nh, hd);
            be.head_rmsnorm_backward(dk, p.g(kn), ik, p.p(kn), w::<B>(rk), n, qw, kv, hd);
        }
        be.matmul_backward(Some(w::<B>(&s.dc)), p.g(wt.qkvw), None, w::<B>(&s.qkv), w::<B>(&a.rms1), p.p(wt.qkvw), n, c, qw);
        // dy += rms1 backward: dy now holds dx
        be.rmsnorm_backward(dyv, p.g(wt.attn_norm), w::<B>(&s.dc), w::<B>(&x), p.p(wt.attn_norm), w::<B>(&a.rstd1), n, c);
        self.stash.recycle(be, a, x);
        dy
    }
}
