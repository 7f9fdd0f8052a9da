//! The shape of a model, apart from its depth.

use serde::{Deserialize, Serialize};

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
    /// The multiplier of each residual branch (1 under the standard parameterisation; 1/sqrt(L)
    /// under `depth_mup`, `model::init`).
    #[serde(default = "one")]
    pub residual: f32,
}

fn one() -> f32 {
    1.0
}

impl Dims {
    pub fn new(vocab: usize, max_seq: usize, channels: usize, heads: usize) -> Self {
        Dims { vocab, padded_vocab: vocab.div_ceil(128) * 128, max_seq, channels, heads, residual: 1.0 }
    }

    /// The same shape with residual branches multiplied by `residual`.
    pub fn with_residual(mut self, residual: f32) -> Self {
        self.residual = residual;
        self
    }
}
