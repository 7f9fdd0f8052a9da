//! FLOP accounting (docs/METHOD.md, "Compute accounting").
//!
//! Two conventions, always reported together and named:
//! - **llm.c**: `6·N + 6·L·T·C` per token, N = every stored parameter (padded vocabulary rows and
//!   position embedding included, as llm.c counts them), the second term for attention.
//! - **non-embedding** (the paper's): `6·N_ne` per token, N_ne = the block parameters plus the final
//!   LayerNorm (the tied head matrix is the embedding, so it is not counted).
//!
//! A progressive run's cost is the sum over steps of the cost of the model as it was at that step.

use crate::model::Dims;

/// Parameters of one block: qkv 3C²+3C, attn proj C²+C, fc 4C²+4C, fc proj 4C²+C, 2 LayerNorms 4C.
pub fn block_params(c: usize) -> u64 {
    let c = c as u64;
    12 * c * c + 13 * c
}

/// Stored embedding parameters: wte (Vp, C) + wpe (maxT, C).
pub fn embedding_params(d: &Dims) -> u64 {
    ((d.padded_vocab + d.max_seq) * d.channels) as u64
}

/// Non-embedding parameters at depth L: the blocks and the final LayerNorm.
pub fn non_embedding_params(d: &Dims, depth: usize) -> u64 {
    depth as u64 * block_params(d.channels) + 2 * d.channels as u64
}

pub fn total_params(d: &Dims, depth: usize) -> u64 {
    embedding_params(d) + non_embedding_params(d, depth)
}

/// Training FLOPs per token, llm.c's convention, for sequences of length `t`.
pub fn flops_per_token_llmc(d: &Dims, depth: usize, t: usize) -> f64 {
    6.0 * total_params(d, depth) as f64 + 6.0 * (depth * t * d.channels) as f64
}

/// Training FLOPs per token, the paper's non-embedding convention.
pub fn flops_per_token_non_embedding(d: &Dims, depth: usize) -> f64 {
    6.0 * non_embedding_params(d, depth) as f64
}
