//! The GPT-2 block kind (`model.arch = "gpt2"`): pre-LayerNorm, multi-head attention, a GELU MLP
//! of 4C units, biases everywhere, learned positions, a head tied to `wte`.
//!
//! - [`Gpt2Tensors`]: the block's table of tensors, as typed handles;
//! - [`body`]: its forward and backward on a backend;
//! - [`hf`]: its Hugging Face mapping (`GPT2LMHeadModel`);
//! - [`Gpt2`]: its facts for generic code, and its host decoder (`taproot sample`).

pub mod body;
pub mod hf;

use crate::model::dims::{Arch, Dims};
use crate::model::host::{attend, gelu, layernorm, linear};
use crate::model::kinds::spec::{HostBlock, KindSpec, KvSlot, Norm, Positions, Sizes};
use crate::model::moe::Mlp;
use crate::params::{Layout, LayoutBuilder, Tensor};

/// A GPT-2 block's tensors, in buffer order.
#[derive(Clone, Copy, Debug)]
pub struct Gpt2Tensors {
    pub ln1w: Tensor,
    pub ln1b: Tensor,
    pub qkvw: Tensor,
    pub qkvb: Tensor,
    pub attprojw: Tensor,
    pub attprojb: Tensor,
    pub ln2w: Tensor,
    pub ln2b: Tensor,
    pub fcw: Tensor,
    pub fcb: Tensor,
    pub fcprojw: Tensor,
    pub fcprojb: Tensor,
}

impl Gpt2Tensors {
    /// The table: each tensor's name and shape, once.
    pub fn new(d: &Dims) -> (Layout, Self) {
        let c = d.channels;
        let mut l = LayoutBuilder::default();
        let t = Gpt2Tensors {
            ln1w: l.add("ln1w", &[c]),
            ln1b: l.add("ln1b", &[c]),
            qkvw: l.add("qkvw", &[3 * c, c]),
            qkvb: l.add("qkvb", &[3 * c]),
            attprojw: l.add("attprojw", &[c, c]),
            attprojb: l.add("attprojb", &[c]),
            ln2w: l.add("ln2w", &[c]),
            ln2b: l.add("ln2b", &[c]),
            fcw: l.add("fcw", &[4 * c, c]),
            fcb: l.add("fcb", &[4 * c]),
            fcprojw: l.add("fcprojw", &[c, 4 * c]),
            fcprojb: l.add("fcprojb", &[c]),
        };
        (l.finish(), t)
    }
}

/// The GPT-2 kind.
pub struct Gpt2;

impl KindSpec for Gpt2 {
    fn arch(&self) -> Arch {
        Arch::Gpt2
    }
    fn layout(&self, d: &Dims, _mlp: Mlp) -> Layout {
        Gpt2Tensors::new(d).0
    }
    fn gains(&self) -> &'static [&'static str] {
        &["ln1w", "ln2w"]
    }
    fn residual_outputs(&self) -> &'static [&'static str] {
        &["attprojw", "attprojb", "fcprojw", "fcprojb"]
    }
    fn norm(&self) -> Norm {
        Norm::LayerNorm
    }
    fn positions(&self) -> Positions {
        Positions::Learned
    }
    fn tied_by_default(&self) -> bool {
        true
    }
    fn takes_key(&self, _key: &str) -> bool {
        false
    }
    fn base_dims(&self, vocab: usize, max_seq: usize, channels: usize, heads: usize) -> Dims {
        Dims::new(vocab, max_seq, channels, heads)
    }
    fn check(&self, _d: &Dims) -> Result<(), String> {
        Ok(())
    }
    /// qkv 3C²+3C, attn proj C²+C, 2 LayerNorms 4C.
    fn attention_params(&self, d: &Dims) -> u64 {
        let c = d.channels as u64;
        4 * c * c + 8 * c
    }
    /// fc (F, C) + bias F, proj (C, F) + bias C.
    fn mlp_params(&self, d: &Dims) -> u64 {
        let (c, f) = (d.channels as u64, d.ffn_hidden as u64);
        2 * f * c + f + c
    }
    fn memory(&self, s: &Sizes) -> (f64, f64) {
        (12.0 * s.c * s.c + 13.0 * s.c, 21.0 * s.c)
    }
    fn host_block(&self, d: &Dims, params: Vec<f32>, _mlp: Mlp) -> Box<dyn HostBlock> {
        Box::new(HostGpt2 { w: Gpt2Tensors::new(d).1, p: params })
    }
}

struct HostGpt2 {
    w: Gpt2Tensors,
    p: Vec<f32>,
}

impl HostBlock for HostGpt2 {
    fn step(&self, d: &Dims, x: &mut [f32], kv: KvSlot, _pos: usize) {
        let (c, nh, alpha) = (d.channels, d.heads, d.residual);
        let (w, p) = (&self.w, &self.p[..]);
        let h = layernorm(x, w.ln1w.of(p), w.ln1b.of(p));
        let qkv = linear(w.qkvw.of(p), Some(w.qkvb.of(p)), &h);
        kv.k.extend_from_slice(&qkv[c..2 * c]);
        kv.v.extend_from_slice(&qkv[2 * c..]);
        let y = attend(&qkv[..c], kv.k, kv.v, nh, nh, c / nh);
        let a = linear(w.attprojw.of(p), Some(w.attprojb.of(p)), &y);
        x.iter_mut().zip(&a).for_each(|(x, a)| *x += alpha * a);
        let h = layernorm(x, w.ln2w.of(p), w.ln2b.of(p));
        let f: Vec<f32> = linear(w.fcw.of(p), Some(w.fcb.of(p)), &h).into_iter().map(gelu).collect();
        let o = linear(w.fcprojw.of(p), Some(w.fcprojb.of(p)), &f);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += alpha * o);
    }
}
