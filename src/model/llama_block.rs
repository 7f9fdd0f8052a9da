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

use crate::backend::pool::ActPool;
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

/// What one micro-batch's forward leaves for its backward (allocated once per shape, then
/// recycled).
struct Acts<B: Backend> {
    shape: (usize, usize),
    input: Option<B::Buf>, // (N, C)
    rms1: B::Buf,          // (N, C)
    rstd1: B::Buf,         // (N)
    qkv3: B::Buf,          // (N, 3·NH·hd) rotated q and k, keys and values repeated per query head
    att: B::Buf,           // attention state
    atty: B::Buf,          // (N, NH·hd)
    res2: B::Buf,          // (N, C)
    rms2: B::Buf,          // (N, C)
    rstd2: B::Buf,         // (N)
    gu: B::Buf,            // (N, 2F)
    h: B::Buf,             // (N, F)
}

impl<B: Backend> Acts<B> {
    fn new(be: &B, d: &LlamaDims, b: usize, t: usize) -> Self {
        let (n, c, a, f) = (b * t, d.channels, d.heads * d.head_size(), d.ffn_hidden);
        Acts {
            shape: (b, t),
            input: None,
            rms1: be.alloc(n * c),
            rstd1: be.alloc(n),
            qkv3: be.alloc(n * 3 * a),
            att: be.alloc(be.attention_state_len(b, t, d.heads)),
            atty: be.alloc(n * a),
            res2: be.alloc(n * c),
            rms2: be.alloc(n * c),
            rstd2: be.alloc(n),
            gu: be.alloc(n * 2 * f),
            h: be.alloc(n * f),
        }
    }
}

/// Working buffers of one forward or backward, one set per block (a stage runs one at a time).
struct Scratch<B: Backend> {
    shape: (usize, usize),
    qkv: B::Buf,   // (N, (NH + 2KV)·hd): the fused projection, then its gradient
    dh: B::Buf,    // (N, F)
    dgu: B::Buf,   // (N, 2F)
    dc: B::Buf,    // (N, C)
    datty: B::Buf, // (N, NH·hd)
    dqkv3: B::Buf, // (N, 3·NH·hd)
    datt: B::Buf,  // attention backward scratch
}

impl<B: Backend> Scratch<B> {
    fn new(be: &B, d: &LlamaDims, b: usize, t: usize) -> Self {
        let (n, c, a, f) = (b * t, d.channels, d.heads * d.head_size(), d.ffn_hidden);
        Scratch {
            shape: (b, t),
            qkv: be.alloc(n * d.qkv_width()),
            dh: be.alloc(n * f),
            dgu: be.alloc(n * 2 * f),
            dc: be.alloc(n * c),
            datty: be.alloc(n * a),
            dqkv3: be.alloc(n * 3 * a),
            datt: be.alloc(be.attention_scratch_len(b, t, d.heads)),
        }
    }
}

pub struct LlamaBlock<B: Backend> {
    pub id: u64,
    pub w: ParamSet<B>,
    pub dims: LlamaDims,
    stash: HashMap<u64, Acts<B>>,
    spare: Vec<Acts<B>>,
    scratch: Option<Scratch<B>>,
    pool: ActPool<B>,
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
        LlamaBlock {
            id,
            w: ParamSet::new(be, Self::layout(dims)),
            dims: dims.clone(),
            stash: HashMap::new(),
            spare: Vec::new(),
            scratch: None,
            pool: ActPool::default(),
        }
    }

    /// Share `pool` (the device's pool, in the actor runtime) instead of a private one.
    pub fn use_pool(&mut self, pool: ActPool<B>) {
        self.pool = pool;
    }

    /// The scratch for micro-batches of (b, t), made on the first one of that shape.
    fn scratch(&mut self, be: &B, b: usize, t: usize) {
        if self.scratch.as_ref().map(|s| s.shape) != Some((b, t)) {
            self.scratch = Some(Scratch::new(be, &self.dims, b, t));
        }
    }

    /// y = block(x) for micro-batch `mb`; x is kept for backward, y comes from the pool.
    pub fn forward(&mut self, be: &B, mb: u64, x: B::Buf, b: usize, t: usize) -> B::Buf {
        let (n, c, nh, kv, hd, f) =
            (b * t, self.dims.channels, self.dims.heads, self.dims.kv_heads, self.dims.head_size(), self.dims.ffn_hidden);
        let (qw, a) = (self.dims.qkv_width(), nh * hd);
        self.scratch(be, b, t);
        let acts = match self.spare.iter().position(|s| s.shape == (b, t)) {
            Some(i) => self.spare.swap_remove(i),
            None => Acts::new(be, &self.dims, b, t),
        };
        let (d, p, qkv) = (&self.dims, &self.w, &self.scratch.as_ref().expect("made above").qkv);
        let y = self.pool.take(be, n * c);
        let xv = w::<B>(&x);
        be.rmsnorm_forward(w::<B>(&acts.rms1), w::<B>(&acts.rstd1), xv, p.p("attn_norm"), n, c, d.norm_eps);
        be.matmul_forward(w::<B>(qkv), w::<B>(&acts.rms1), p.p("qkvw"), None, n, c, qw);
        // Rotary positions on the q and k heads, then every query head gets its group's k, v.
        be.rope(w::<B>(qkv), n, t, qw, nh + kv, hd, d.rope_theta, false);
        be.gqa_expand(w::<B>(&acts.qkv3), w::<B>(qkv), n, nh, kv, hd);
        be.attention_forward(w::<B>(&acts.atty), w::<B>(&acts.att), w::<B>(&acts.qkv3), b, t, a, nh);
        be.matmul_forward(w::<B>(&y), w::<B>(&acts.atty), p.p("ow"), None, n, a, c);
        be.add(w::<B>(&acts.res2), xv, w::<B>(&y));
        be.rmsnorm_forward(w::<B>(&acts.rms2), w::<B>(&acts.rstd2), w::<B>(&acts.res2), p.p("mlp_norm"), n, c, d.norm_eps);
        be.matmul_forward(w::<B>(&acts.gu), w::<B>(&acts.rms2), p.p("gate_upw"), None, n, c, 2 * f);
        be.swiglu_forward(w::<B>(&acts.h), w::<B>(&acts.gu), n, f);
        be.matmul_forward(w::<B>(&y), w::<B>(&acts.h), p.p("downw"), None, n, f, c);
        be.add_assign(w::<B>(&y), w::<B>(&acts.res2));
        let mut acts = acts;
        acts.input = Some(x);
        if let Some(old) = self.stash.insert(mb, acts) {
            // A micro-batch id reused before its backward: keep the memory, drop nothing.
            self.recycle(be, old);
        }
        y
    }

    fn recycle(&mut self, be: &B, mut a: Acts<B>) {
        if let Some(x) = a.input.take() {
            self.pool.put(be, x);
        }
        self.spare.push(a);
    }

    /// dx = d block / dx · dy for micro-batch `mb`; parameter gradients accumulate. `dy` is
    /// updated in place and returned as dx.
    pub fn backward(&mut self, be: &B, mb: u64, dy: B::Buf) -> B::Buf {
        let a =
            self.stash.remove(&mb).unwrap_or_else(|| panic!("llama layer {}: backward for micro-batch {mb} without a forward", self.id));
        let (b, t) = a.shape;
        self.scratch(be, b, t);
        let (d, p, s) = (&self.dims, &self.w, self.scratch.as_ref().expect("made above"));
        let (n, c, nh, kv, hd, f) = (b * t, d.channels, d.heads, d.kv_heads, d.head_size(), d.ffn_hidden);
        let (qw, att_c) = (d.qkv_width(), nh * hd);
        let x = a.input.as_ref().expect("stash holds its input");
        let dyv = w::<B>(&dy);
        // MLP branch: y = res2 + down(swiglu(gate_up(rms2(res2))))
        be.matmul_backward(Some(w::<B>(&s.dh)), p.g("downw"), None, dyv, w::<B>(&a.h), p.p("downw"), n, f, c);
        be.swiglu_backward(w::<B>(&s.dgu), w::<B>(&a.gu), w::<B>(&s.dh), n, f);
        be.matmul_backward(Some(w::<B>(&s.dc)), p.g("gate_upw"), None, w::<B>(&s.dgu), w::<B>(&a.rms2), p.p("gate_upw"), n, c, 2 * f);
        // dy += rms2 backward: dy now holds dres2
        be.rmsnorm_backward(dyv, p.g("mlp_norm"), w::<B>(&s.dc), w::<B>(&a.res2), p.p("mlp_norm"), w::<B>(&a.rstd2), n, c);
        // Attention branch: res2 = x + o(attn(share(rotary(qkv(rms1(x))))))
        be.matmul_backward(Some(w::<B>(&s.datty)), p.g("ow"), None, dyv, w::<B>(&a.atty), p.p("ow"), n, att_c, c);
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
        be.matmul_backward(Some(w::<B>(&s.dc)), p.g("qkvw"), None, w::<B>(&s.qkv), w::<B>(&a.rms1), p.p("qkvw"), n, c, qw);
        // dy += rms1 backward: dy now holds dx
        be.rmsnorm_backward(dyv, p.g("attn_norm"), w::<B>(&s.dc), w::<B>(x), p.p("attn_norm"), w::<B>(&a.rstd1), n, c);
        self.recycle(be, a);
        dy
    }
}
