//! `Embed`: token (+ position) embedding, the first unit of the pipeline.
//!
//! Owns `wte` (Vp, C) — also the LM head's matrix when the head is tied, see the `model` docs —
//! and, for `gpt2`, the learned positions `wpe` (maxT, C). The LLaMA kinds have no position table:
//! their blocks rotate q and k by position instead.

use super::dims::Dims;
use super::init;
use super::kinds::{self, spec::Positions};
use crate::backend::pool::ActPool;
use crate::backend::Backend;
use crate::params::{Layout, LayoutBuilder, ParamSet, Tensor};

/// The embedding's tensors: `wte` (Vp, C) and, for a kind with learned positions, `wpe` (maxT, C).
#[derive(Clone, Copy, Debug)]
pub struct EmbedTensors {
    pub wte: Tensor,
    pub wpe: Option<Tensor>,
}

impl EmbedTensors {
    pub fn new(d: &Dims) -> (Layout, Self) {
        let mut l = LayoutBuilder::default();
        let wte = l.add("wte", &[d.padded_vocab, d.channels]);
        let learned = kinds::spec(d.arch).positions() == Positions::Learned;
        let wpe = learned.then(|| l.add("wpe", &[d.max_seq, d.channels]));
        (l.finish(), EmbedTensors { wte, wpe })
    }
}

pub struct Embed<B: Backend> {
    pub w: ParamSet<B>,
    pub t: EmbedTensors,
    pub dims: Dims,
    pool: ActPool<B>,
}

impl<B: Backend> Embed<B> {
    pub fn layout(d: &Dims) -> Layout {
        EmbedTensors::new(d).0
    }

    pub fn new(be: &B, dims: &Dims, cfg: &init::InitConfig) -> Self {
        let (layout, t) = EmbedTensors::new(dims);
        let w = ParamSet::new(be, layout);
        w.params_from_host(be, &init::embed_init(w.layout.total, t.wte, t.wpe, dims, cfg));
        Embed { w, t, dims: dims.clone(), pool: ActPool::default() }
    }

    /// x (B, T, C) = wte[ids] (+ wpe[0..T]). The returned buffer comes from this unit's pool.
    pub fn forward(&mut self, be: &B, ids: &B::Ids, b: usize, t: usize) -> B::Buf {
        let c = self.dims.channels;
        assert!(t <= self.dims.max_seq, "sequence length {t} exceeds max_seq {}", self.dims.max_seq);
        let x = self.pool.take(be, b * t * c);
        let wpe = self.t.wpe.map(|p| self.w.p(p));
        be.encoder_forward(B::whole(&x), ids, self.w.p(self.t.wte), wpe, b, t, c);
        x
    }

    /// dwte[ids] += dx (dwpe += dx). Takes the gradient buffer back into the pool.
    pub fn backward(&mut self, be: &B, dx: B::Buf, ids: &B::Ids, b: usize, t: usize) {
        let c = self.dims.channels;
        let dwpe = self.t.wpe.map(|p| self.w.g(p));
        be.encoder_backward(self.w.g(self.t.wte), dwpe, B::whole(&dx), ids, b, t, c);
        self.pool.put(be, dx);
    }

    /// Give back a buffer that came out of the pipeline without a backward (evaluation).
    pub fn recycle(&mut self, be: &B, buf: B::Buf) {
        self.pool.put(be, buf);
    }

    /// Share `pool` (the device's pool, in the actor runtime) instead of a private one.
    pub fn use_pool(&mut self, pool: ActPool<B>) {
        self.pool = pool;
    }
}
