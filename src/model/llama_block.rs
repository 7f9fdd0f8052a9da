//! `LlamaBlock`: one pre-RMSNorm LLaMA-style transformer layer, as a unit with an explicit
//! forward and backward (the `llama` block kind; not yet wired into the model and the runtime,
//! which train GPT-2 blocks).
//!
//! ```text
//! x ─► rms1 ─► qkv = rms1 @ Wqkv^T ─► rotary(q, k) ─► share k, v over head groups ─►
//!      causal attention ─► @ Wo^T + x = res2
//! res2 ─► rms2 ─► [gate | up] = rms2 @ Wgu^T ─► silu(gate)·up ─► @ Wdown^T + res2 = y
//! ```
//!
//! No biases; grouped-query attention (`kv_heads` key/value heads shared by `heads / kv_heads`
//! query heads each); SwiGLU with `ffn_hidden` units. Fused tensors keep the products few:
//! `qkvw` is q_proj, k_proj and v_proj stacked (rows (NH + 2·KV)·hd), `gate_upw` is gate_proj
//! and up_proj stacked (rows 2F); an export splits them into the Hugging Face names. Shapes are
//! for N = B·T rows.

use crate::backend::{Backend, View};
use crate::params::{Layout, ParamSet};
use std::collections::HashMap;

/// The shape of a LLaMA-style block.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaDims {
    /// Channels C.
    pub channels: usize,
    /// Query heads NH (head size hd = C / NH).
    pub heads: usize,
    /// Key/value heads KV (NH a multiple of KV; KV = NH is plain multi-head attention).
    pub kv_heads: usize,
    /// SwiGLU hidden units F.
    pub ffn_hidden: usize,
    /// Rotary base θ.
    pub rope_theta: f32,
    /// RMSNorm's ε.
    pub norm_eps: f32,
}

impl LlamaDims {
    pub fn head_size(&self) -> usize {
        self.channels / self.heads
    }
    /// Columns of the fused q, k, v rows: (NH + 2·KV)·hd.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_size()
    }
}

/// What one micro-batch's forward leaves for its backward.
struct Acts<B: Backend> {
    shape: (usize, usize),
    input: B::Buf, // (N, C)
    rms1: B::Buf,  // (N, C)
    rstd1: B::Buf, // (N)
    qkv3: B::Buf,  // (N, 3·NH·hd) rotated q and k, keys and values repeated per query head
    att: B::Buf,   // attention state
    atty: B::Buf,  // (N, NH·hd)
    res2: B::Buf,  // (N, C)
    rms2: B::Buf,  // (N, C)
    rstd2: B::Buf, // (N)
    gu: B::Buf,    // (N, 2F)
    h: B::Buf,     // (N, F)
}

pub struct LlamaBlock<B: Backend> {
    pub id: u64,
    pub w: ParamSet<B>,
    pub dims: LlamaDims,
    stash: HashMap<u64, Acts<B>>,
}

fn w<B: Backend>(buf: &B::Buf) -> View<'_, B::Buf> {
    B::whole(buf)
}

impl<B: Backend> LlamaBlock<B> {
    pub fn layout(d: &LlamaDims) -> Layout {
        let (c, f) = (d.channels, d.ffn_hidden);
        Layout::new(&[
            ("attn_norm", vec![c]),
            ("qkvw", vec![d.qkv_width(), c]),
            ("ow", vec![c, d.heads * d.head_size()]),
            ("mlp_norm", vec![c]),
            ("gate_upw", vec![2 * f, c]),
            ("downw", vec![c, f]),
        ])
    }

    /// A block with zeroed parameters (the caller fills them).
    pub fn new_empty(be: &B, dims: &LlamaDims, id: u64) -> Self {
        assert!(
            dims.heads.is_multiple_of(dims.kv_heads) && dims.channels.is_multiple_of(dims.heads) && dims.head_size().is_multiple_of(2),
            "llama block: heads {} must be a multiple of kv_heads {}, and channels {} of heads with an even head size",
            dims.heads,
            dims.kv_heads,
            dims.channels
        );
        LlamaBlock { id, w: ParamSet::new(be, Self::layout(dims)), dims: dims.clone(), stash: HashMap::new() }
    }

    /// y = block(x) for micro-batch `mb`; x is kept for backward.
    pub fn forward(&mut self, be: &B, mb: u64, x: B::Buf, b: usize, t: usize) -> B::Buf {
        let d = &self.dims;
        let (n, c, nh, kv, hd, f) = (b * t, d.channels, d.heads, d.kv_heads, d.head_size(), d.ffn_hidden);
        let (qw, a) = (d.qkv_width(), nh * hd);
        let p = &self.w;
        let acts = Acts {
            shape: (b, t),
            rms1: be.alloc(n * c),
            rstd1: be.alloc(n),
            qkv3: be.alloc(n * 3 * a),
            att: be.alloc(be.attention_state_len(b, t, nh)),
            atty: be.alloc(n * a),
            res2: be.alloc(n * c),
            rms2: be.alloc(n * c),
            rstd2: be.alloc(n),
            gu: be.alloc(n * 2 * f),
            h: be.alloc(n * f),
            input: x,
        };
        let y = be.alloc(n * c);
        let qkv = be.alloc(n * qw);
        let xv = w::<B>(&acts.input);
        be.rmsnorm_forward(w::<B>(&acts.rms1), w::<B>(&acts.rstd1), xv, p.p("attn_norm"), n, c, d.norm_eps);
        be.matmul_forward(w::<B>(&qkv), w::<B>(&acts.rms1), p.p("qkvw"), None, n, c, qw);
        // Rotary positions on the q and k heads, then every query head gets its group's k, v.
        be.rope(w::<B>(&qkv), n, t, qw, nh + kv, hd, d.rope_theta, false);
        be.gqa_expand(w::<B>(&acts.qkv3), w::<B>(&qkv), n, nh, kv, hd);
        be.attention_forward(w::<B>(&acts.atty), w::<B>(&acts.att), w::<B>(&acts.qkv3), b, t, a, nh);
        be.matmul_forward(w::<B>(&y), w::<B>(&acts.atty), p.p("ow"), None, n, a, c);
        be.add(w::<B>(&acts.res2), xv, w::<B>(&y));
        be.rmsnorm_forward(w::<B>(&acts.rms2), w::<B>(&acts.rstd2), w::<B>(&acts.res2), p.p("mlp_norm"), n, c, d.norm_eps);
        be.matmul_forward(w::<B>(&acts.gu), w::<B>(&acts.rms2), p.p("gate_upw"), None, n, c, 2 * f);
        be.swiglu_forward(w::<B>(&acts.h), w::<B>(&acts.gu), n, f);
        be.matmul_forward(w::<B>(&y), w::<B>(&acts.h), p.p("downw"), None, n, f, c);
        be.add_assign(w::<B>(&y), w::<B>(&acts.res2));
        self.stash.insert(mb, acts);
        y
    }

    /// dx = d block / dx · dy for micro-batch `mb`; parameter gradients accumulate. `dy` is
    /// updated in place and returned as dx.
    pub fn backward(&mut self, be: &B, mb: u64, dy: B::Buf) -> B::Buf {
        let s =
            self.stash.remove(&mb).unwrap_or_else(|| panic!("llama layer {}: backward for micro-batch {mb} without a forward", self.id));
        let (b, t) = s.shape;
        let d = &self.dims;
        let (n, c, nh, kv, hd, f) = (b * t, d.channels, d.heads, d.kv_heads, d.head_size(), d.ffn_hidden);
        let (qw, a) = (d.qkv_width(), nh * hd);
        let p = &self.w;
        let dyv = w::<B>(&dy);
        // MLP branch: y = res2 + down(swiglu(gate_up(rms2(res2))))
        let (dh, dgu, dc) = (be.alloc(n * f), be.alloc(n * 2 * f), be.alloc(n * c));
        be.matmul_backward(Some(w::<B>(&dh)), p.g("downw"), None, dyv, w::<B>(&s.h), p.p("downw"), n, f, c);
        be.swiglu_backward(w::<B>(&dgu), w::<B>(&s.gu), w::<B>(&dh), n, f);
        be.matmul_backward(Some(w::<B>(&dc)), p.g("gate_upw"), None, w::<B>(&dgu), w::<B>(&s.rms2), p.p("gate_upw"), n, c, 2 * f);
        // dy += rms2 backward: dy now holds dres2
        be.rmsnorm_backward(dyv, p.g("mlp_norm"), w::<B>(&dc), w::<B>(&s.res2), p.p("mlp_norm"), w::<B>(&s.rstd2), n, c);
        // Attention branch: res2 = x + o(attn(share(rotary(qkv(rms1(x))))))
        let (datty, dqkv3, dqkv) = (be.alloc(n * a), be.alloc(n * 3 * a), be.alloc(n * qw));
        let datt = be.alloc(be.attention_scratch_len(b, t, nh));
        be.matmul_backward(Some(w::<B>(&datty)), p.g("ow"), None, dyv, w::<B>(&s.atty), p.p("ow"), n, a, c);
        be.attention_backward(w::<B>(&dqkv3), w::<B>(&datt), w::<B>(&datty), w::<B>(&s.qkv3), w::<B>(&s.atty), w::<B>(&s.att), b, t, a, nh);
        be.gqa_reduce(w::<B>(&dqkv), w::<B>(&dqkv3), n, nh, kv, hd);
        be.rope(w::<B>(&dqkv), n, t, qw, nh + kv, hd, d.rope_theta, true);
        be.matmul_backward(Some(w::<B>(&dc)), p.g("qkvw"), None, w::<B>(&dqkv), w::<B>(&s.rms1), p.p("qkvw"), n, c, qw);
        // dy += rms1 backward: dy now holds dx
        be.rmsnorm_backward(dyv, p.g("attn_norm"), w::<B>(&dc), w::<B>(&s.input), p.p("attn_norm"), w::<B>(&s.rstd1), n, c);
        dy
    }
}
