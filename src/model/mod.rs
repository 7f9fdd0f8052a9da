//! The model as the units a pipeline stage owns: [`Embed`], [`Block`] (one transformer layer) and
//! [`Head`] (final LayerNorm + tied LM head + loss), plus [`Model`], their sequential composition.
//!
//! Every unit owns a [`ParamSet`]: ONE contiguous parameter buffer, ONE gradient buffer of the same
//! layout, and its optimizer state, described by a [`Layout`] (name, shape, offset per tensor).
//! Units never reach into each other's memory, except for the one documented exception below.
//!
//! **The tied embedding.** The LM head multiplies by the token embedding `wte` (GPT-2's tie), and
//! the tie must be exact: `wte` receives the sum of the embedding gradient and the head gradient.
//! We keep ONE copy of `wte`, owned by [`Embed`], and have [`Head`] borrow it (read `wte`, add into
//! `dwte`). In the actor runtime both ends of the pipeline live in one actor, so the pipeline is a
//! ring (ends → layer 0 → … → layer L-1 → ends) and no copy or gradient exchange is ever needed.
//! The alternative (Megatron's two copies and an all-reduce of their gradients at each step) costs
//! a (Vp, C) transfer per step and two copies that must be kept equal; the ring costs nothing
//! while the ends share a device, which is also where the data and the loss are.
//!
//! A 0-layer model is `Embed → Head`: no blocks at all.

pub mod block;
pub mod embed;
pub mod growth;
pub mod head;
pub mod init;

pub use block::Block;
pub use embed::Embed;
pub use head::Head;

use crate::backend::{Backend, View};
use crate::optim::OptState;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The shape of a GPT-2 model, without its depth (depth changes as it grows).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dims {
    /// Real vocabulary size V.
    pub vocab: usize,
    /// Vocabulary padded to a multiple of 128 for the matrices (llm.c's Vp).
    pub padded_vocab: usize,
    /// Maximum sequence length (rows of the position embedding).
    pub max_seq: usize,
    /// Channels C.
    pub channels: usize,
    /// Attention heads NH.
    pub heads: usize,
}

impl Dims {
    pub fn new(vocab: usize, max_seq: usize, channels: usize, heads: usize) -> Self {
        Dims { vocab, padded_vocab: vocab.div_ceil(128) * 128, max_seq, channels, heads }
    }
}

/// One tensor of a unit: its name, shape and offset in the unit's buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// An embedding table (`wte`, `wpe`): Muon or NSGD per `embedding_optimizer`, AdamW under
    /// `muon_adamw`.
    pub is_embedding: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// A 2-D tensor (Muon's domain; AdamW's weight-decay domain).
    pub fn is_matrix(&self) -> bool {
        self.shape.len() == 2
    }
    pub fn rows(&self) -> usize {
        self.shape[0]
    }
    pub fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }
}

/// The tensors of a unit, in buffer order.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub specs: Vec<ParamSpec>,
    pub total: usize,
}

impl Layout {
    /// Build from (name, shape) in order; the embedding tables are the ones named `wte`, `wpe`.
    pub fn new(tensors: &[(&'static str, Vec<usize>)]) -> Self {
        let mut specs = Vec::with_capacity(tensors.len());
        let mut off = 0;
        for (name, shape) in tensors {
            let spec = ParamSpec { name, shape: shape.clone(), offset: off, is_embedding: matches!(*name, "wte" | "wpe") };
            off += spec.numel();
            specs.push(spec);
        }
        Layout { specs, total: off }
    }
    pub fn get(&self, name: &str) -> &ParamSpec {
        self.specs.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no tensor named {name} in layout"))
    }
    pub fn index(&self, name: &str) -> usize {
        self.specs.iter().position(|s| s.name == name).unwrap_or_else(|| panic!("no tensor named {name} in layout"))
    }
}

/// A unit's parameters, gradients and optimizer state, all in the same layout.
pub struct ParamSet<B: Backend> {
    pub layout: Layout,
    pub params: B::Buf,
    pub grads: B::Buf,
    pub state: OptState<B>,
}

impl<B: Backend> ParamSet<B> {
    pub fn new(be: &B, layout: Layout) -> Self {
        let params = be.alloc(layout.total);
        let grads = be.alloc(layout.total);
        let state = OptState::new(be, &layout);
        ParamSet { layout, params, grads, state }
    }
    /// View of one parameter tensor.
    pub fn p(&self, name: &str) -> View<'_, B::Buf> {
        let s = self.layout.get(name);
        View::new(&self.params, s.offset, s.numel())
    }
    /// View of one gradient tensor.
    pub fn g(&self, name: &str) -> View<'_, B::Buf> {
        let s = self.layout.get(name);
        View::new(&self.grads, s.offset, s.numel())
    }
    pub fn zero_grad(&self, be: &B) {
        be.fill(B::whole(&self.grads), 0.0);
    }
    /// Σ g² over the unit's gradients (for the gradient norm metric).
    pub fn grad_sumsq(&self, be: &B, scratch: &mut crate::optim::Scratch<B>) -> f64 {
        scratch.sumsq(be, B::whole(&self.grads))
    }
    pub fn numel(&self) -> usize {
        self.layout.total
    }
    /// Host copy of all parameters (checkpoints, tests).
    pub fn params_to_host(&self, be: &B) -> Vec<f32> {
        let mut v = vec![0.0; self.layout.total];
        be.download(B::whole(&self.params), &mut v);
        v
    }
    pub fn grads_to_host(&self, be: &B) -> Vec<f32> {
        let mut v = vec![0.0; self.layout.total];
        be.download(B::whole(&self.grads), &mut v);
        v
    }
    pub fn params_from_host(&self, be: &B, host: &[f32]) {
        be.upload(B::whole(&self.params), host);
    }
}

/// A recycling pool of (N, C) activation and gradient buffers handed between stages.
///
/// A stage takes its output buffer from the pool and puts back the input buffer it no longer
/// needs after backward, so after the first step nothing allocates (buffers circulate).
///
/// A pool belongs to ONE device. In the actor runtime every stage on a device shares that
/// device's pool (clones share), so a buffer can be put back by one stream and taken by another:
/// each free buffer carries the event after its last use, and `take` makes the taking stream wait
/// on it. A buffer handed to another device is copied there (see `runtime::messages`) and sent
/// home with [`ActPool::put_after`], so no device's memory is ever touched by another device's
/// kernels and every device's buffer count stays bounded, however the layers are placed.
pub struct ActPool<B: Backend> {
    inner: Arc<PoolInner<B>>,
}

struct PoolInner<B: Backend> {
    free: Mutex<Vec<(B::Buf, B::Event)>>,
    /// Buffers this pool has allocated over its life (a leak shows as growth after warmup).
    allocated: AtomicUsize,
    /// Bytes copied into this device from other devices.
    peer_bytes_in: AtomicU64,
}

impl<B: Backend> Clone for ActPool<B> {
    fn clone(&self) -> Self {
        ActPool { inner: self.inner.clone() }
    }
}

impl<B: Backend> Default for ActPool<B> {
    fn default() -> Self {
        ActPool {
            inner: Arc::new(PoolInner { free: Mutex::new(Vec::new()), allocated: Default::default(), peer_bytes_in: Default::default() }),
        }
    }
}

impl<B: Backend> ActPool<B> {
    /// A buffer of `n` floats, free for stream `be` to write: a recycled one (after `be` waits
    /// for its last user), or a new allocation.
    pub fn take(&self, be: &B, n: usize) -> B::Buf {
        let found = {
            let mut free = self.inner.free.lock().expect("pool lock");
            free.iter().position(|(b, _)| B::buf_len(b) == n).map(|i| free.swap_remove(i))
        };
        match found {
            Some((buf, ready)) => {
                be.wait(&ready);
                buf
            }
            None => {
                self.inner.allocated.fetch_add(1, Ordering::Relaxed);
                be.alloc(n)
            }
        }
    }

    /// Give back `buf` after the work stream `be` has queued on it so far.
    pub fn put(&self, be: &B, buf: B::Buf) {
        assert!(be.is_local(&buf), "a buffer put into the pool of {} belongs to another device", be.device());
        let ready = be.record();
        self.put_after(buf, ready);
    }

    /// Give back `buf`, free once `ready` has passed (an event of any stream, any device).
    pub fn put_after(&self, buf: B::Buf, ready: B::Event) {
        self.inner.free.lock().expect("pool lock").push((buf, ready));
    }

    /// Buffers allocated by this pool so far.
    pub fn allocated(&self) -> usize {
        self.inner.allocated.load(Ordering::Relaxed)
    }

    /// Count `bytes` copied into this pool's device from another device.
    pub fn note_peer_copy(&self, bytes: u64) {
        self.inner.peer_bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes copied into this pool's device from other devices so far.
    pub fn peer_bytes_in(&self) -> u64 {
        self.inner.peer_bytes_in.load(Ordering::Relaxed)
    }
}

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
    /// (METHOD.md: grown and fixed models start their blocks alike).
    pub fn new(be: &B, dims: Dims, depth: usize, init: &init::InitConfig) -> Self {
        let embed = Embed::new(be, &dims, init);
        let head = Head::new(be, &dims);
        let blocks = (0..depth as u64).map(|id| Block::new_init(be, &dims, id, init)).collect();
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

/// A host snapshot of a unit: parameters and optimizer state. Used by growth (`copying` reads
/// its sources this way, as a layer actor answers `GetState`) and by checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitState {
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Option<Vec<f32>>,
    pub steps: Vec<u64>,
}

impl<B: Backend> ParamSet<B> {
    pub fn snapshot(&self, be: &B) -> UnitState {
        let mut m = vec![0.0; self.layout.total];
        be.download(B::whole(&self.state.m), &mut m);
        let v = self.state.v.as_ref().map(|v| {
            let mut h = vec![0.0; self.layout.total];
            be.download(B::whole(v), &mut h);
            h
        });
        UnitState { params: self.params_to_host(be), m, v, steps: self.state.steps.clone() }
    }

    /// Load parameters and optimizer state from a snapshot of the same layout.
    pub fn restore(&mut self, be: &B, s: &UnitState) -> anyhow::Result<()> {
        let n = self.layout.total;
        anyhow::ensure!(
            s.params.len() == n && s.m.len() == n && s.steps.len() == self.layout.specs.len(),
            "unit state does not match the layout: {} params for {n}, {} step counters for {} tensors",
            s.params.len(),
            s.steps.len(),
            self.layout.specs.len()
        );
        self.params_from_host(be, &s.params);
        be.upload(B::whole(&self.state.m), &s.m);
        match &s.v {
            Some(v) => {
                anyhow::ensure!(v.len() == n, "second-moment state of {} values for {n} parameters", v.len());
                let dst = be.alloc(n);
                be.upload(B::whole(&dst), v);
                self.state.v = Some(dst);
            }
            None => self.state.v = None,
        }
        self.state.steps.clone_from(&s.steps);
        Ok(())
    }
}
