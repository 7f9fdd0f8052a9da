//! `Head`: the final norm, the LM head, and the loss.
//!
//! The final norm is the kind's ([`KindSpec::norm`](super::kinds::spec::KindSpec::norm)):
//! LayerNorm (`lnfw`, `lnfb`) or RMSNorm (`normw`).
//! A **tied** head (GPT-2's, and any kind's under `model.tie_embeddings = true`) owns only the
//! norm: it borrows `wte` from [`Embed`]'s parameter set and adds its gradient into `Embed`'s
//! `dwte` (the tie; see the `model` docs). An **untied** head (the LLaMA kinds' default) owns its
//! own `lm_head` (Vp, C) as well, and its gradient stays in the head.
//! Forward and backward run back to back (the last stage of 1F1B does exactly that), so the head
//! keeps one set of activations rather than a per-micro-batch stash.
//!
//! [`Embed`]: super::Embed

use super::dims::Dims;
use super::embed::EmbedTensors;
use super::init;
use super::kinds::{self, spec::Norm};
use crate::backend::pool::ActPool;
use crate::backend::Backend;
use crate::params::{Layout, LayoutBuilder, ParamSet, Tensor};

/// The head's tensors: the final norm's gain (and, LayerNorm, bias) — `lnfw`, `lnfb` or
/// `normw` — and an untied `lm_head` (Vp, C).
#[derive(Clone, Copy, Debug)]
pub struct HeadTensors {
    pub norm: Norm,
    pub norm_w: Tensor,
    pub norm_b: Option<Tensor>,
    pub lm_head: Option<Tensor>,
}

impl HeadTensors {
    pub fn new(d: &Dims) -> (Layout, Self) {
        let c = d.channels;
        let norm = kinds::spec(d.arch).norm();
        let mut l = LayoutBuilder::default();
        let (norm_w, norm_b) = match norm {
            Norm::LayerNorm => (l.add("lnfw", &[c]), Some(l.add("lnfb", &[c]))),
            Norm::RmsNorm => (l.add("normw", &[c]), None),
        };
        let lm_head = (!d.tied).then(|| l.add("lm_head", &[d.padded_vocab, c]));
        (l.finish(), HeadTensors { norm, norm_w, norm_b, lm_head })
    }
}

struct HeadActs<B: Backend> {
    shape: (usize, usize),
    lnf: B::Buf,    // (N, C)
    mean: B::Buf,   // (N)
    rstd: B::Buf,   // (N)
    logits: B::Buf, // (N, Vp), overwritten by dlogits
    losses: B::Buf, // (N)
    dlnf: B::Buf,   // (N, C)
    host_losses: Vec<f32>,
}

pub struct Head<B: Backend> {
    pub w: ParamSet<B>,
    pub t: HeadTensors,
    /// The embedding's `wte`, in the embedding's parameter set (the tied head's matrix).
    wte: Tensor,
    pub dims: Dims,
    acts: Option<HeadActs<B>>,
    pool: ActPool<B>,
    /// The head's share of the tied `wte` gradient, (Vp, C), accumulated over the micro-batches
    /// of a step and added into `Embed`'s `dwte` once, by [`Head::flush_tied_grad`], before the
    /// optimizer step. Keeping the two shares apart until then makes the sum independent of how
    /// head and embedding work interleave in a pipeline (float addition is not associative):
    /// `dwte = Σ embedding parts + Σ head parts`, in micro-batch order, always.
    dwte: Option<B::Buf>,
}

impl<B: Backend> Head<B> {
    pub fn layout(d: &Dims) -> Layout {
        HeadTensors::new(d).0
    }

    pub fn new(be: &B, dims: &Dims, cfg: &init::InitConfig) -> Self {
        let (layout, t) = HeadTensors::new(dims);
        let w = ParamSet::new(be, layout);
        w.params_from_host(be, &init::head_init(w.layout.total, t.norm_w, t.lm_head, dims, cfg));
        let wte = EmbedTensors::new(dims).1.wte;
        Head { w, t, wte, dims: dims.clone(), acts: None, pool: ActPool::default(), dwte: None }
    }

    /// The LM head's matrix (Vp, C): the borrowed `wte` when tied, else the head's own.
    fn matrix<'a>(&'a self, embed: &'a ParamSet<B>) -> crate::backend::View<'a, B::Buf> {
        match self.t.lm_head {
            Some(h) => self.w.p(h),
            None => embed.p(self.wte),
        }
    }

    /// Share `pool` (the device's pool, in the actor runtime) instead of a private one.
    pub fn use_pool(&mut self, pool: ActPool<B>) {
        self.pool = pool;
    }

    fn ensure_acts(&mut self, be: &B, b: usize, t: usize) {
        if self.acts.as_ref().map(|a| a.shape) != Some((b, t)) {
            let (n, c, vp) = (b * t, self.dims.channels, self.dims.padded_vocab);
            self.acts = Some(HeadActs {
                shape: (b, t),
                lnf: be.alloc_act(n * c),
                mean: be.alloc(n),
                rstd: be.alloc(n),
                logits: be.alloc_act(n * vp),
                losses: be.alloc(n),
                dlnf: be.alloc_act(n * c),
                host_losses: vec![0.0; n],
            });
        }
    }

    /// lnf = norm(x); logits = lnf @ W^T. Returns nothing; the activations stay in `self.acts`.
    fn forward_logits(&mut self, be: &B, x: &B::Buf, embed: &ParamSet<B>, b: usize, t: usize) {
        self.ensure_acts(be, b, t);
        let a = self.acts.as_ref().expect("acts ensured");
        let (n, c, vp) = (b * t, self.dims.channels, self.dims.padded_vocab);
        let (w, p) = (&self.t, &self.w);
        match w.norm_b {
            Some(bias) => {
                be.layernorm_forward(B::whole(&a.lnf), B::whole(&a.mean), B::whole(&a.rstd), B::whole(x), p.p(w.norm_w), p.p(bias), n, c)
            }
            None => be.rmsnorm_forward(B::whole(&a.lnf), B::whole(&a.rstd), B::whole(x), p.p(w.norm_w), n, c, self.dims.norm_eps),
        }
        be.matmul_forward(B::whole(&a.logits), B::whole(&a.lnf), self.matrix(embed), None, n, c, vp);
    }

    /// Fused softmax cross-entropy; returns the mean loss over the N rows (host read-back).
    fn loss(&mut self, be: &B, targets: &B::Ids, dscale: f32, n: usize) -> f32 {
        let a = self.acts.as_mut().expect("forward_logits first");
        be.crossentropy_forward_backward(
            B::whole(&a.logits),
            B::whole(&a.losses),
            targets,
            dscale,
            n,
            self.dims.vocab,
            self.dims.padded_vocab,
        );
        be.download(B::whole(&a.losses), &mut a.host_losses);
        // Sum in f64 so the mean does not depend on summation order subtleties.
        (a.host_losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64) as f32
    }

    /// Loss and its gradient for one micro-batch: returns (dx, mean loss).
    /// `x` is consumed (kept in the pool); the head's share of dwte accumulates in `self.dwte`
    /// until [`Head::flush_tied_grad`].
    pub fn forward_backward(
        &mut self,
        be: &B,
        _mb: u64,
        x: B::Buf,
        targets: &B::Ids,
        embed: &ParamSet<B>,
        dscale: f32,
        b: usize,
        t: usize,
    ) -> (B::Buf, f32) {
        let (n, c, vp) = (b * t, self.dims.channels, self.dims.padded_vocab);
        self.forward_logits(be, &x, embed, b, t);
        let loss = self.loss(be, targets, dscale, n);
        if self.dims.tied && self.dwte.is_none() {
            self.dwte = Some(be.alloc(vp * c));
        }
        // The matrix's gradient: the tied share, kept apart until the flush, or the own lm_head's.
        let dmat = match (&self.dwte, self.t.lm_head) {
            (Some(d), _) => B::whole(d),
            (None, Some(h)) => self.w.g(h),
            (None, None) => unreachable!("a tied head keeps its share of dwte"),
        };
        let a = self.acts.as_ref().expect("acts ensured");
        // logits now hold dlogits (N, Vp)
        be.matmul_backward(Some(B::whole(&a.dlnf)), dmat, None, B::whole(&a.logits), B::whole(&a.lnf), self.matrix(embed), n, c, vp);
        let dx = self.pool.take(be, n * c);
        be.fill(B::whole(&dx), 0.0); // the norms' backward accumulates into dx
        let (w, p) = (&self.t, &self.w);
        match w.norm_b {
            Some(bias) => be.layernorm_backward(
                B::whole(&dx),
                p.g(w.norm_w),
                p.g(bias),
                B::whole(&a.dlnf),
                B::whole(&x),
                p.p(w.norm_w),
                B::whole(&a.mean),
                B::whole(&a.rstd),
                n,
                c,
            ),
            None => {
                be.rmsnorm_backward(B::whole(&dx), p.g(w.norm_w), B::whole(&a.dlnf), B::whole(&x), p.p(w.norm_w), B::whole(&a.rstd), n, c)
            }
        }
        self.pool.put(be, x);
        (dx, loss)
    }

    /// Add the head's accumulated share of the tied gradient into `embed`'s `dwte` and clear it.
    /// Call once per optimizer step, after the last micro-batch's backward.
    pub fn flush_tied_grad(&mut self, be: &B, embed: &ParamSet<B>) {
        if let Some(d) = &self.dwte {
            be.add_assign(embed.g(self.wte), B::whole(d));
            be.fill(B::whole(d), 0.0);
        }
    }

    /// Mean loss only (evaluation). Returns the input buffer to hand back to `Embed`.
    pub fn loss_only(&mut self, be: &B, x: B::Buf, targets: &B::Ids, embed: &ParamSet<B>, b: usize, t: usize) -> (B::Buf, f32) {
        self.forward_logits(be, &x, embed, b, t);
        let loss = self.loss(be, targets, 0.0, b * t);
        (x, loss)
    }

    /// Raw logits (B, T, Vp) on the host. Returns the input buffer too.
    pub fn logits(&mut self, be: &B, x: B::Buf, embed: &ParamSet<B>, b: usize, t: usize) -> (B::Buf, Vec<f32>) {
        self.forward_logits(be, &x, embed, b, t);
        let a = self.acts.as_ref().expect("acts ensured");
        let mut out = vec![0.0; b * t * self.dims.padded_vocab];
        be.download(B::whole(&a.logits), &mut out);
        (x, out)
    }
}
