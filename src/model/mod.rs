//! The model as the units a pipeline stage owns: [`Embed`], [`Block`] (one transformer layer, of
//! the kind `Dims::arch` says: GPT-2, LLaMA or Qwen3) and [`Head`] (final norm + LM head + loss),
//! plus [`Model`], their sequential composition.
//!
//! Every unit owns a [`ParamSet`]: ONE contiguous parameter buffer, ONE gradient buffer of the same
//! layout, and its optimizer state, described by a [`Layout`] (name, shape, offset per tensor).
//! Units never reach into each other's memory, except for the one documented exception below.
//!
//! **The tied embedding.** A tied LM head multiplies by the token embedding `wte` (GPT-2's tie), and
//! the tie must be exact: `wte` receives the sum of the embedding gradient and the head gradient.
//! We keep ONE copy of `wte`, owned by [`Embed`], and have [`Head`] borrow it (read `wte`, add into
//! `dwte`). In the actor runtime both ends of the pipeline live in one actor, so the pipeline is a
//! ring (embed-head actor → layer 0 → … → layer L-1 → embed-head actor) and no copy or gradient exchange is ever needed.
//! The alternative (Megatron's two copies and an all-reduce of their gradients at each step) costs
//! a (Vp, C) transfer per step and two copies that must be kept equal; the ring costs nothing
//! while the ends share a device, which is also where the data and the loss are.
//!
//! A 0-layer model is `Embed → Head`: no blocks at all.

pub mod block;
pub mod dims;
pub mod embed;
pub mod growth;
pub mod head;
pub mod host;
pub mod init;
pub mod kinds;
pub mod moe;
pub mod residual;
pub mod stash;

pub use block::Block;
pub use dims::{Arch, Dims};
pub use embed::Embed;
pub use head::Head;

use crate::backend::Backend;

/// A whole model composed sequentially: the unit of the sequential trainer and of the tests.
pub struct Model<B: Backend> {
    pub dims: Dims,
    pub embed: Embed<B>,
    pub blocks: Vec<Block<B>>,
    pub head: Head<B>,
    /// The next stable layer id to give a newborn block (ids are birth order).
    pub next_id: u64,
}

/// The micro-batch id reserved for forward-only passes (evaluation, logits).
pub const EVAL_MB: u64 = u64::MAX;

/// One micro-batch's inputs on the device.
pub struct Batch<B: Backend> {
    pub inputs: B::Ids,
    pub targets: B::Ids,
    pub b: usize,
    pub t: usize,
}

impl<B: Backend> Batch<B> {
    /// From (B, T+1) windows, row-major: inputs are tokens 0..T of a row, targets 1..T+1.
    pub fn from_windows(be: &B, windows: &[u32], b: usize, t: usize) -> Self {
        assert_eq!(windows.len(), b * (t + 1), "expected {b} windows of {} tokens", t + 1);
        let mut inp = Vec::with_capacity(b * t);
        let mut tgt = Vec::with_capacity(b * t);
        for r in 0..b {
            let w = &windows[r * (t + 1)..(r + 1) * (t + 1)];
            inp.extend_from_slice(&w[..t]);
            tgt.extend_from_slice(&w[1..]);
        }
        let inputs = be.alloc_ids(b * t);
        let targets = be.alloc_ids(b * t);
        be.upload_ids(&inputs, &inp);
        be.upload_ids(&targets, &tgt);
        Batch { inputs, targets, b, t }
    }
    /// Reuse the device buffers for a new micro-batch of the same shape.
    pub fn load(&mut self, be: &B, windows: &[u32], inp: &mut Vec<u32>, tgt: &mut Vec<u32>) {
        let (b, t) = (self.b, self.t);
        assert_eq!(windows.len(), b * (t + 1));
        inp.clear();
        tgt.clear();
        for r in 0..b {
            let w = &windows[r * (t + 1)..(r + 1) * (t + 1)];
            inp.extend_from_slice(&w[..t]);
            tgt.extend_from_slice(&w[1..]);
        }
        be.upload_ids(&self.inputs, inp);
        be.upload_ids(&self.targets, tgt);
    }
}

impl<B: Backend> Model<B> {
    /// A fresh model of `depth` blocks; `target_depth` sets the residual-projection init scale
    /// (docs/METHOD.md: grown and fixed models start their blocks alike).
    pub fn new(be: &B, dims: Dims, depth: usize, init: &init::InitConfig) -> Self {
        let embed = Embed::new(be, &dims, init);
        let head = Head::new(be, &dims, init);
        let blocks = (0..depth)
            .map(|p| Block::new_init_mlp(be, &dims, p as u64, init, block::mlp_at_birth(&dims, p, depth, init.target_depth, false)))
            .collect();
        Model { dims, embed, blocks, head, next_id: depth as u64 }
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Forward and backward over one micro-batch. Gradients accumulate into every unit's grads
    /// (the head's share of the tied `wte` gradient separately, until [`Model::finish_grads`]);
    /// `dscale` scales the loss gradient (1 / (N * micro_batches) for a mean over a step).
    /// Returns the mean loss over the micro-batch (a host read-back: the step's one sync point).
    pub fn forward_backward(&mut self, be: &B, batch: &Batch<B>, dscale: f32) -> f32 {
        let mb = 0;
        let mut x = self.embed.forward(be, &batch.inputs, batch.b, batch.t);
        for blk in self.blocks.iter_mut() {
            x = blk.forward(be, mb, x, batch.b, batch.t);
        }
        let (mut dx, loss) = self.head.forward_backward(be, mb, x, &batch.targets, &self.embed.w, dscale, batch.b, batch.t);
        for blk in self.blocks.iter_mut().rev() {
            dx = blk.backward(be, mb, dx);
        }
        self.embed.backward(be, dx, &batch.inputs, batch.b, batch.t);
        loss
    }

    /// Complete the gradients of a step: add the head's share of the tied `wte` gradient into the
    /// embedding's. Call once after the step's last micro-batch, before reading or applying them.
    pub fn finish_grads(&mut self, be: &B) {
        self.head.flush_tied_grad(be, &self.embed.w);
    }

    /// Forward only (evaluation): mean loss over the batch; gradients untouched.
    pub fn eval_loss(&mut self, be: &B, batch: &Batch<B>) -> f32 {
        let x = self.forward_blocks(be, batch);
        let (x, loss) = self.head.loss_only(be, x, &batch.targets, &self.embed.w, batch.b, batch.t);
        self.embed.recycle(be, x);
        loss
    }

    /// Logits (B, T, Vp) of a batch, for function-preservation tests.
    pub fn logits(&mut self, be: &B, batch: &Batch<B>) -> Vec<f32> {
        let x = self.forward_blocks(be, batch);
        let (x, out) = self.head.logits(be, x, &self.embed.w, batch.b, batch.t);
        self.embed.recycle(be, x);
        out
    }

    /// Embedding and blocks without keeping anything for backward.
    fn forward_blocks(&mut self, be: &B, batch: &Batch<B>) -> B::Buf {
        let mb = EVAL_MB; // a slot of its own, so an evaluation never disturbs training stashes
        let mut x = self.embed.forward(be, &batch.inputs, batch.b, batch.t);
        for blk in self.blocks.iter_mut() {
            x = blk.forward(be, mb, x, batch.b, batch.t);
            blk.forget(be, mb);
        }
        x
    }

    pub fn zero_grad(&self, be: &B) {
        self.embed.w.zero_grad(be);
        self.head.w.zero_grad(be);
        for b in &self.blocks {
            b.w.zero_grad(be);
        }
    }

    /// All parameter counts: (total, embedding, non-embedding).
    pub fn param_counts(&self) -> (usize, usize, usize) {
        let emb = self.embed.w.numel();
        let rest = self.head.w.numel() + self.blocks.iter().map(|b| b.w.numel()).sum::<usize>();
        (emb + rest, emb, rest)
    }
}
