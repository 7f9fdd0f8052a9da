//! `Head`: the final norm, the LM head, and the loss.
//!
//! The final norm is GPT-2's LayerNorm (`lnfw`, `lnfb`) or the LLaMA kinds' RMSNorm (`normw`).
//! A **tied** head (GPT-2's, and any kind's under `model.tie_embeddings = true`) owns only the
//! norm: it borrows `wte` from [`Embed`]'s parameter set and adds its gradient into `Embed`'s
//! `dwte` (the tie; see the `model` docs). An **untied** head (the LLaMA kinds' default) owns its
//! own `lm_head` (Vp, C) as well, and its gradient stays in the head.
//! Forward and backward run back to back (the last stage of 1F1B does exactly that), so the head
//! keeps one set of activations rather than a per-micro-batch stash.
//!
//! [`Embed`]: super::Embed

use super::dims::Dims;
use super::init;
use crate::backend::pool::ActPool;
use crate::backend::Backend;
use crate::params::{Layout, ParamSet};

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
        let c = d.channels;
        let mut specs = if d.arch.is_gpt2() { vec![("lnfw", vec![c]), ("lnfb", vec![c])] } else { vec![("normw", vec![c])] };
        if !d.tied {
            specs.push(("lm_head", vec![d.padded_vocab, c]));
        }
        Layout::new(&specs)
    }

    pub fn new(be: &B, dims: &Dims, cfg: &init::InitConfig) -> Self {
        let w = ParamSet::new(be, Self::layout(dims));
        w.params_from_host(be, &init::head_init(&w.layout, dims, cfg));
        Head { w, dims: dims.clone(), acts: None, pool: ActPool::default(), dwte: None }
    }

    /// The LM head's matrix (Vp, C): the borrowed `wte` when tied, else the head's own.
    fn matrix<'a>(&'a self, embed: &'a ParamSet<B>) -> crate::backend::View<'a, B::Buf> {
        if self.dims.tied {
            embed.p("wte")
        } else {
            self.w.p("lm_head")
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
                lnf: be.alloc(n * c),
                mean: be.alloc(n),
                rstd: be.alloc(n),
                logits: be.alloc(n * vp),
                losses: be.alloc(n),
                dlnf: be.alloc(n * c),
                host_losses: vec![0.0; n],
            });
        }
    }

    /// lnf = norm(x); logits = lnf @ W^T. Returns nothing; the activations stay in `self.acts`.
    fn forward_logits(&mut self, be: &B, x: &B::Buf, embed: &ParamSet<B>, b: usize, t: usize) {
        self.ensure_acts(be, b, t);
        let a = self.acts.as_ref().expect("acts ensured");
        let (n, c, vp) = (b * t, self.dims.channels, self.dims.padded_vocab);
        if self.dims.arch.is_gpt2() {
            be.layernorm_forward(
                B::whole(&a.lnf),
                B::whole(&a.mean),
                B::whole(&a.rstd),
                B::whole(x),
                self.w.p("lnfw"),
                self.w.p("lnfb"),
                n,
                c,
            );
        } else {
            be.rmsnorm_forward(B::whole(&a.lnf), B::whole(&a.rstd), B::whole(x), self.w.p("normw"), n, c, self.dims.norm_eps);
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
    #[allow(clippy::too_many_arguments)]
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
        let dmat = match &self.dwte {
            Some(d) => B::whole(d),
            None => self.w.g("lm_head"),
        };
        let a = self.acts.as_ref().expect("acts ensured");
        // logits now hold dlogits (N, Vp)
        be.matmul_backward(Some(B::whole(&a.dlnf)), dmat, None, B::whole(&a.logits), B::whole(&a.lnf), self.matrix(embed), n, c, vp);
        let dx = self.pool.take(be, n * c);
        be.fill(B::whole(&dx), 0.0); // the norms' backward accumulates into dx
        if self.dims.arch.is_gpt2() {
            be.layernorm_backward(
                B::whole(&dx),
                self.w.g("lnfw"),
                self.w.g("lnfb"),
                B::whole(&a.dlnf),
                B::whole(&x),
                self.w.p("lnfw"),
                B::whole(&a.mean),
                B::whole(&a.rstd),
                n,
                c,
            );
        } else {
            be.rmsnorm_backward(
                B::whole(&dx),
                self.w.g("normw"),
                B::whole(&a.dlnf),
                B::whole(&x),
                self.w.p("normw"),
                B::whole(&a.rstd),
                n,
                c,
            );
        }
        self.pool.put(be, x);
        (dx, loss)
    }

    /// Add the head's accumulated share of the tied gradient into `embed`'s `dwte` and clear it.
    /// Call once per optimizer step, after the last micro-batch's backward.
    pub fn flush_tied_grad(&mut self, be: &B, embed: &ParamSet<B>) {
        if let Some(d) = &self.dwte {
            be.add_assign(embed.g("wte"), B::whole(d));
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
