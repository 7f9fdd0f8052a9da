//! The shape of a model, apart from its depth: the block kind (`model.arch`) and its sizes.

use serde::{Deserialize, Serialize};

/// The kind of transformer block (`model.arch`), which also decides the embedding and the head.
/// Each kind lives in its folder under `model::kinds`, whose registry maps these to them.
///
/// | | `gpt2` | `llama` | `qwen3` |
/// |---|---|---|---|
/// | positions | learned `wpe` | rotary (θ = `rope_theta`) | rotary |
/// | norms | LayerNorm (w, b) | RMSNorm (w) | RMSNorm (w) |
/// | attention | multi-head, biases | grouped-query (`kv_heads`), no biases | as llama, plus RMSNorm on each query and key head (QK-norm) |
/// | MLP | GELU, 4C, biases | SwiGLU, `ffn_hidden`, no biases | as llama |
/// | LM head | tied to `wte` | untied by default (`model.tie_embeddings`) | as llama |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    #[default]
    Gpt2,
    Llama,
    Qwen3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// The shape of a model, without its depth (depth changes as it grows).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dims {
    /// Real vocabulary size V.
    pub vocab: usize,
    /// Vocabulary padded to a multiple of 128 for the matrices (llm.c's Vp).
    pub padded_vocab: usize,
    /// Maximum sequence length (rows of the position embedding; the context of a rotary model).
    pub max_seq: usize,
    /// Channels C.
    pub channels: usize,
    /// Attention (query) heads NH.
    pub heads: usize,
    /// The multiplier of each residual branch (1 under the standard parameterisation; 1/sqrt(L)
    /// under `depth_mup`, `model::init`).
    pub residual: f32,
    /// The block kind.
    pub arch: Arch,
    /// Key/value heads KV (= NH for `gpt2`: plain multi-head attention).
    pub kv_heads: usize,
    /// MLP hidden units (4C for `gpt2`; SwiGLU's F for the LLaMA kinds).
    pub ffn_hidden: usize,
    /// Rotary base θ (LLaMA kinds).
    pub rope_theta: f32,
    /// RMSNorm's ε (LLaMA kinds; GPT-2's LayerNorm uses 1e-5).
    pub norm_eps: f32,
    /// Whether the LM head is the token embedding `wte` (tied) or a matrix of its own (`lm_head`).
    pub tied: bool,
    /// The mixture-of-experts MLP of the blocks that have one (`[model.moe]`; LLaMA kinds).
    pub moe: Option<super::moe::Moe>,
}

impl Dims {
    /// A GPT-2 shape.
    pub fn new(vocab: usize, max_seq: usize, channels: usize, heads: usize) -> Self {
        Dims {
            vocab,
            padded_vocab: vocab.div_ceil(128) * 128,
            max_seq,
            channels,
            heads,
            residual: 1.0,
            arch: Arch::Gpt2,
            kv_heads: heads,
            ffn_hidden: 4 * channels,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tied: true,
            moe: None,
        }
    }

    /// A LLaMA-style shape (`kv_heads` key/value heads, `ffn_hidden` SwiGLU units, untied head,
    /// θ = 10000, ε = 1e-6); [`Dims::with_arch`] makes it `qwen3`.
    pub fn llama(vocab: usize, max_seq: usize, channels: usize, heads: usize, kv_heads: usize, ffn_hidden: usize) -> Self {
        Dims { arch: Arch::Llama, kv_heads, ffn_hidden, norm_eps: 1e-6, tied: false, ..Dims::new(vocab, max_seq, channels, heads) }
    }

    /// The same shape with residual branches multiplied by `residual`.
    pub fn with_residual(mut self, residual: f32) -> Self {
        self.residual = residual;
        self
    }

    /// The same sizes with another block kind.
    pub fn with_arch(mut self, arch: Arch) -> Self {
        self.arch = arch;
        self
    }

    /// The same shape with the LM head tied to `wte` or not.
    pub fn with_tied(mut self, tied: bool) -> Self {
        self.tied = tied;
        self
    }

    /// The same shape whose MoE blocks have the mixture `moe`.
    pub fn with_moe(mut self, moe: super::moe::Moe) -> Self {
        self.moe = Some(moe);
        self
    }

    /// The head size hd = C / NH.
    pub fn head_size(&self) -> usize {
        self.channels / self.heads
    }

    /// The default SwiGLU width: 8C/3 (a SwiGLU MLP then holds the 8C² weights of GPT-2's 4C
    /// GELU MLP), rounded up to a multiple of 8.
    pub fn default_ffn_hidden(channels: usize) -> usize {
        (8 * channels).div_ceil(3).div_ceil(8) * 8
    }
}
