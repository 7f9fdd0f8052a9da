//! The LLaMA block family: `llama` (pre-RMSNorm, rotary positions, grouped-query attention, a
//! SwiGLU MLP, no biases, an untied head) and `qwen3` (llama plus RMSNorm on each query and key
//! head, QK-norm). Either takes a mixture-of-experts MLP (`[model.moe]`) in place of SwiGLU.
//!
//! - [`LlamaTensors`]: the block's table of tensors, as typed handles (experts as a `Vec`);
//! - [`body`]: its forward and backward on a backend, [`moe`] the mixture's;
//! - [`hf`]: its Hugging Face mapping (`LlamaForCausalLM`, `Qwen3ForCausalLM`,
//!   `Qwen3MoeForCausalLM`);
//! - [`Llama`]: the facts of both kinds for generic code, and the host decoder.

pub mod body;
pub mod hf;
pub mod moe;

use crate::model::dims::{Arch, Dims};
use crate::model::host::{attend, linear, rmsnorm, rotate, swiglu_mlp};
use crate::model::kinds::spec::{HostBlock, KindSpec, KvSlot, Norm, Positions, Sizes};
use crate::model::moe::{route, Mlp, Moe, Routing};
use crate::params::{Layout, LayoutBuilder, Tensor};

/// Columns of the fused q, k, v rows: (NH + 2·KV)·hd.
pub fn qkv_width(d: &Dims) -> usize {
    (d.heads + 2 * d.kv_heads) * d.head_size()
}

/// One routed expert's tensors: its fused [gate | up] (2F, C) and its down (C, F).
#[derive(Clone, Copy, Debug)]
pub struct Expert {
    pub gate_upw: Tensor,
    pub downw: Tensor,
}

/// The mixture's tensors: the router, its balancing bias (`sigmoid`), the shared experts as
/// one SwiGLU of S·F units, and each routed expert.
#[derive(Clone, Debug)]
pub struct MoeTensors {
    pub routerw: Tensor,
    pub router_bias: Option<Tensor>,
    /// (gate_up, down) of the shared experts.
    pub shared: Option<(Tensor, Tensor)>,
    pub experts: Vec<Expert>,
}

/// A block's MLP tensors: a dense SwiGLU or a mixture of experts.
#[derive(Clone, Debug)]
pub enum MlpTensors {
    Dense { gate_upw: Tensor, downw: Tensor },
    Moe(MoeTensors),
}

/// A LLaMA-family block's tensors, in buffer order.
#[derive(Clone, Debug)]
pub struct LlamaTensors {
    pub attn_norm: Tensor,
    /// q_proj, k_proj and v_proj stacked: rows (NH + 2·KV)·hd.
    pub qkvw: Tensor,
    /// `qwen3`: the gains of the q-head and k-head RMSNorms.
    pub qk_norm: Option<(Tensor, Tensor)>,
    pub ow: Tensor,
    pub mlp_norm: Tensor,
    pub mlp: MlpTensors,
}

impl LlamaTensors {
    /// The table: each tensor's name and shape, once. `qk_norm` for `qwen3`; the mixture when
    /// `mlp` is MoE (and `d` has one).
    pub fn new(d: &Dims, qk_norm: bool, mlp: Mlp) -> (Layout, Self) {
        let (c, f, hd) = (d.channels, d.ffn_hidden, d.head_size());
        let mut l = LayoutBuilder::default();
        let attn_norm = l.add("attn_norm", &[c]);
        let qkvw = l.add("qkvw", &[qkv_width(d), c]);
        let qk_norm = qk_norm.then(|| (l.add("q_norm", &[hd]), l.add("k_norm", &[hd])));
        let ow = l.add("ow", &[c, d.heads * hd]);
        let mlp_norm = l.add("mlp_norm", &[c]);
        let mlp = match d.moe.as_ref().filter(|_| mlp == Mlp::Moe) {
            Some(m) => MlpTensors::Moe(moe_tensors(&mut l, m, c)),
            None => MlpTensors::Dense { gate_upw: l.add("gate_upw", &[2 * f, c]), downw: l.add("downw", &[c, f]) },
        };
        (l.finish(), LlamaTensors { attn_norm, qkvw, qk_norm, ow, mlp_norm, mlp })
    }
}

fn moe_tensors(l: &mut LayoutBuilder, m: &Moe, c: usize) -> MoeTensors {
    let f = m.hidden;
    let routerw = l.add("routerw", &[m.experts, c]);
    let router_bias = (m.routing == Routing::Sigmoid).then(|| l.add("router_bias", &[m.experts]));
    let shared = (m.shared > 0).then(|| (l.add("shared_gate_upw", &[2 * m.shared * f, c]), l.add("shared_downw", &[c, m.shared * f])));
    let experts = (0..m.experts)
        .map(|e| Expert {
            gate_upw: l.add(format!("expert.{e}.gate_upw"), &[2 * f, c]),
            downw: l.add(format!("expert.{e}.downw"), &[c, f]),
        })
        .collect();
    MoeTensors { routerw, router_bias, shared, experts }
}

/// The `llama` and `qwen3` kinds (`qk_norm` tells them apart).
pub struct Llama {
    pub qk_norm: bool,
}

pub static LLAMA: Llama = Llama { qk_norm: false };
pub static QWEN3: Llama = Llama { qk_norm: true };

impl KindSpec for Llama {
    fn arch(&self) -> Arch {
        if self.qk_norm {
            Arch::Qwen3
        } else {
            Arch::Llama
        }
    }
    fn layout(&self, d: &Dims, mlp: Mlp) -> Layout {
        LlamaTensors::new(d, self.qk_norm, mlp).0
    }
    fn gains(&self) -> &'static [&'static str] {
        if self.qk_norm {
            &["attn_norm", "mlp_norm", "q_norm", "k_norm"]
        } else {
            &["attn_norm", "mlp_norm"]
        }
    }
    fn residual_outputs(&self) -> &'static [&'static str] {
        &["ow", "downw"]
    }
    /// `ow`, the dense `downw`, and an MoE block's every expert's and the shared experts' down.
    fn is_residual_output(&self, name: &str) -> bool {
        name == "ow" || name.ends_with("downw")
    }
    fn norm(&self) -> Norm {
        Norm::RmsNorm
    }
    fn positions(&self) -> Positions {
        Positions::Rotary
    }
    fn tied_by_default(&self) -> bool {
        false
    }
    fn takes_key(&self, _key: &str) -> bool {
        true
    }
    fn base_dims(&self, vocab: usize, max_seq: usize, channels: usize, heads: usize) -> Dims {
        Dims::llama(vocab, max_seq, channels, heads, heads, Dims::default_ffn_hidden(channels)).with_arch(self.arch())
    }
    fn check(&self, d: &Dims) -> Result<(), String> {
        if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) || !d.head_size().is_multiple_of(2) {
            return Err(format!(
                "{} block: heads {} must be a multiple of kv_heads {}, with an even head size",
                self.arch().name(),
                d.heads,
                d.kv_heads
            ));
        }
        Ok(())
    }
    /// 2 RMSNorm gains 2C, qkv (NH+2KV)·hd·C, o C·NH·hd; `qwen3` adds the q and k gains 2·hd.
    fn attention_params(&self, d: &Dims) -> u64 {
        let (c, hd) = (d.channels as u64, d.head_size() as u64);
        let (nh, kv) = (d.heads as u64, d.kv_heads as u64);
        let qk_norm = if self.qk_norm { 2 * hd } else { 0 };
        2 * c + (nh + 2 * kv) * hd * c + c * nh * hd + qk_norm
    }
    /// gate and up (F, C), down (C, F).
    fn mlp_params(&self, d: &Dims) -> u64 {
        3 * d.ffn_hidden as u64 * d.channels as u64
    }
    fn memory(&self, s: &Sizes) -> (f64, f64) {
        let (c, nh) = (s.c, s.nh);
        let hd = (c / nh).floor();
        let qw = (nh + 2.0 * s.kv) * hd;
        let qk = if self.qk_norm { qw } else { 0.0 };
        let (mlp, mlp_act) = match s.moe {
            // Every block counted as MoE (an upper bound): all experts stored; per token k
            // slots of input, output and 3·F_e hidden floats, and E logits.
            Some((e, k, sh, fe)) => (e * c + (e + sh) * 3.0 * fe * c, k * (2.0 * c + 3.0 * fe) + e + 3.0 * sh * fe),
            None => (3.0 * s.ff * c, 3.0 * s.ff),
        };
        (2.0 * c + qw * c + c * nh * hd + mlp + 2.0 * hd, 5.0 * c + 4.0 * nh * hd + mlp_act + qk)
    }
    fn host_block(&self, d: &Dims, params: Vec<f32>, mlp: Mlp) -> Box<dyn HostBlock> {
        Box::new(HostLlama { w: LlamaTensors::new(d, self.qk_norm, mlp).1, p: params })
    }
}

struct HostLlama {
    w: LlamaTensors,
    p: Vec<f32>,
}

impl HostBlock for HostLlama {
    fn step(&self, d: &Dims, x: &mut [f32], kv: KvSlot, pos: usize) {
        let (nh, kvh, hd, alpha) = (d.heads, d.kv_heads, d.head_size(), d.residual);
        let (w, p) = (&self.w, &self.p[..]);
        let h = rmsnorm(x, w.attn_norm.of(p), d.norm_eps);
        let mut qkv = linear(w.qkvw.of(p), None, &h);
        let (q, rest) = qkv.split_at_mut(nh * hd);
        let (k, v) = rest.split_at_mut(kvh * hd);
        if let Some((qn, kn)) = w.qk_norm {
            for (heads, g) in [(&mut *q, qn.of(p)), (&mut *k, kn.of(p))] {
                for head in heads.chunks_exact_mut(hd) {
                    let n = rmsnorm(head, g, d.norm_eps);
                    head.copy_from_slice(&n);
                }
            }
        }
        rotate(q, hd, pos, d.rope_theta);
        rotate(k, hd, pos, d.rope_theta);
        kv.k.extend_from_slice(k);
        kv.v.extend_from_slice(v);
        let y = attend(q, kv.k, kv.v, nh, kvh, hd);
        let o = linear(w.ow.of(p), None, &y);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += alpha * o);
        let h = rmsnorm(x, w.mlp_norm.of(p), d.norm_eps);
        let o = match (&w.mlp, &d.moe) {
            (MlpTensors::Moe(mt), Some(m)) => host_moe(mt, p, m, &h),
            (MlpTensors::Dense { gate_upw, downw }, _) => swiglu_mlp(gate_upw.of(p), downw.of(p), &h),
            (MlpTensors::Moe(_), None) => unreachable!("an MoE block of a shape without [model.moe]"),
        };
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += alpha * o);
    }
}

/// The mixture of experts at one position: the token's k experts weighted by the router (the
/// training's routing, `model::moe::route`), plus the shared experts.
fn host_moe(mt: &MoeTensors, p: &[f32], m: &Moe, x: &[f32]) -> Vec<f32> {
    let logits = linear(mt.routerw.of(p), None, x);
    let r = route(&logits, mt.router_bias.map(|b| b.of(p)), 1, m.experts, m.top_k, m.routing);
    let mut out = match mt.shared {
        Some((gu, down)) => swiglu_mlp(gu.of(p), down.of(p), x),
        None => vec![0.0; x.len()],
    };
    for (&e, &wt) in r.experts.iter().zip(&r.weights) {
        let ex = mt.experts[e as usize];
        let y = swiglu_mlp(ex.gate_upw.of(p), ex.downw.of(p), x);
        out.iter_mut().zip(&y).for_each(|(o, y)| *o += wt * y);
    }
    out
}
