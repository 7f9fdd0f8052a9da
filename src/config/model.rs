//! `[model]` and `[model.moe]`: the model's shape, its block kind and its mixture of experts.

use crate::model::dims::Arch;
use crate::model::init::{InitScheme, Parameterization};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The block kind: `gpt2` (default), `llama` or `qwen3` (`model::Arch`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub arch: Arch,
    /// C.
    pub channels: usize,
    /// NH (query heads).
    pub heads: usize,
    /// Key/value heads of grouped-query attention (LLaMA kinds; default: `heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_heads: Option<usize>,
    /// SwiGLU hidden units (LLaMA kinds; default: 8C/3 rounded up to a multiple of 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_hidden: Option<usize>,
    /// Rotary base θ (LLaMA kinds; default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f32>,
    /// RMSNorm's ε (LLaMA kinds; default 1e-6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f32>,
    /// Whether the LM head is the token embedding (default: true for `gpt2`, false otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_embeddings: Option<bool>,
    /// A mixture-of-experts MLP in place of the dense one (LLaMA kinds; `model::moe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// Rows of the position embedding (default: `data.seq_len`).
    #[serde(default)]
    pub max_seq: Option<usize>,
    /// Blocks at step 0 (0 or 1 for progressive training; the target for a fixed-size run).
    pub depth: usize,
    /// Blocks at the end; sets the residual-projection init scale. Default: the largest
    /// `growth[N].to_depth`, else `depth`.
    #[serde(default)]
    pub target_depth: Option<usize>,
    #[serde(default)]
    pub init: InitScheme,
    /// `standard` or `depth_mup` (a 1/sqrt(L) multiplier on each residual branch; `model::init`).
    #[serde(default, skip_serializing_if = "Parameterization::is_standard")]
    pub parameterization: Parameterization,
}

/// `[model.moe]`: the mixture-of-experts MLP (`model::moe`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Routed experts E.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Shared experts that every token goes through (default 0).
    #[serde(default)]
    pub shared_experts: usize,
    /// SwiGLU hidden units of each expert (default: `model.ffn_hidden`'s value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_hidden: Option<usize>,
    /// `softmax` (renormalised top-k; default) or `sigmoid` (with the aux-loss-free bias).
    #[serde(default)]
    pub routing: crate::model::moe::Routing,
    /// γ of the balancing bias's update after each step (`sigmoid` routing; default 0.001).
    #[serde(default = "default_bias_rate")]
    pub bias_update_rate: f32,
    /// Blocks whose position in the final model is below this are dense (default 0).
    #[serde(default)]
    pub first_dense_layers: usize,
    /// Weight of the auxiliary balancing loss E·Σ f_e·P_e (default 0: none; `model::moe`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub aux_loss: f32,
}

fn is_zero(x: &f32) -> bool {
    *x == 0.0
}

fn default_bias_rate() -> f32 {
    0.001
}

fn is_default(a: &Arch) -> bool {
    *a == Arch::default()
}
