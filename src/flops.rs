//! FLOP accounting (docs/METHOD.md, "Compute accounting").
//!
//! Two conventions, always reported together and named:
//! - **llm.c**: `6·N + 6·L·T·C` per token, N = every stored parameter (padded vocabulary rows,
//!   the position embedding and an untied `lm_head` included, as llm.c counts them), the second
//!   term for attention.
//! - **non-embedding** (the paper's): `6·N_ne` per token, N_ne = the block parameters plus the
//!   final norm. The vocabulary matrices (`wte`, `wpe`, an untied `lm_head`) are not counted, as
//!   in Kaplan et al.'s convention.
//!
//! Parameter counts are closed forms per block kind; `tests/arch.rs` checks them against the
//! layouts the model allocates. A mixture-of-experts model's FLOPs count the parameters each
//! token uses (its k routed experts, the shared ones and the router), not every expert.
//!
//! A progressive run's cost is the sum over steps of the cost of the model as it was at that step.

use crate::model::kinds::{self, spec::Norm, spec::Positions};
use crate::model::Dims;
use std::collections::BTreeMap;

/// Parameters of one dense block of `d`'s kind:
/// - `gpt2`: qkv 3C²+3C, attn proj C²+C, fc 4C²+4C, fc proj 4C²+C, 2 LayerNorms 4C = 12C²+13C;
/// - `llama`: 2 RMSNorm gains 2C, qkv (NH+2KV)·hd·C, o C·NH·hd, gate/up 2F·C, down F·C;
/// - `qwen3`: llama + the q and k norms' gains 2·hd.
pub fn block_params(d: &Dims) -> u64 {
    // GPT-2's MLP: fc (F, C) + bias F, proj (C, F) + bias C; SwiGLU's: gate and up (F, C), down (C, F).
    attention_params(d) + kinds::spec(d.arch).mlp_params(d)
}

/// A block's parameters outside its MLP (norms, attention; GPT-2's biases but the MLP's).
fn attention_params(d: &Dims) -> u64 {
    kinds::spec(d.arch).attention_params(d)
}

/// Parameters of one MoE block (stored: every expert), and those a token uses (active: the k
/// experts it is routed to, the shared experts and the router).
pub fn moe_block_params(d: &Dims) -> Option<(u64, u64)> {
    let m = d.moe.as_ref()?;
    let (c, f) = (d.channels as u64, m.hidden as u64);
    let expert = 3 * f * c;
    let bias = if m.routing == crate::model::moe::Routing::Sigmoid { m.experts as u64 } else { 0 };
    let common = attention_params(d) + m.experts as u64 * c + bias + m.shared as u64 * expert;
    Some((common + m.experts as u64 * expert, common + m.top_k as u64 * expert))
}

/// The dense blocks of a depth-L model under `[model.moe]`: its first `first_dense_layers`
/// (counted as the model has them), all of them without MoE.
fn dense_blocks(d: &Dims, depth: usize) -> usize {
    d.moe.as_ref().map_or(depth, |m| m.first_dense.min(depth))
}

/// Stored vocabulary-sized parameters: wte (Vp, C), wpe (maxT, C) for `gpt2`, an untied lm_head (Vp, C).
pub fn embedding_params(d: &Dims) -> u64 {
    let wpe = if kinds::spec(d.arch).positions() == Positions::Learned { d.max_seq } else { 0 };
    let lm_head = if d.tied { 0 } else { d.padded_vocab };
    ((d.padded_vocab + wpe + lm_head) * d.channels) as u64
}

fn final_norm(d: &Dims) -> u64 {
    let tensors = match kinds::spec(d.arch).norm() {
        Norm::LayerNorm => 2,
        Norm::RmsNorm => 1,
    };
    tensors * d.channels as u64
}

/// Non-embedding parameters at depth L (stored): the blocks and the final norm (LayerNorm 2C,
/// RMSNorm C).
pub fn non_embedding_params(d: &Dims, depth: usize) -> u64 {
    let dense = dense_blocks(d, depth);
    let moe = moe_block_params(d).map_or(0, |p| p.0) * (depth - dense) as u64;
    dense as u64 * block_params(d) + moe + final_norm(d)
}

/// Non-embedding parameters a token uses at depth L: as stored for a dense model; an MoE block
/// counts its active parameters.
pub fn active_non_embedding_params(d: &Dims, depth: usize) -> u64 {
    let dense = dense_blocks(d, depth);
    let moe = moe_block_params(d).map_or(0, |p| p.1) * (depth - dense) as u64;
    dense as u64 * block_params(d) + moe + final_norm(d)
}

pub fn total_params(d: &Dims, depth: usize) -> u64 {
    embedding_params(d) + non_embedding_params(d, depth)
}

/// Training FLOPs per token, llm.c's convention, for sequences of length `t` (an MoE model's
/// active parameters in place of N).
pub fn flops_per_token_llmc(d: &Dims, depth: usize, t: usize) -> f64 {
    6.0 * (embedding_params(d) + active_non_embedding_params(d, depth)) as f64 + 6.0 * (depth * t * d.channels) as f64
}

/// Training FLOPs per token, the paper's non-embedding convention (active parameters).
pub fn flops_per_token_non_embedding(d: &Dims, depth: usize) -> f64 {
    6.0 * active_non_embedding_params(d, depth) as f64
}

/// Non-embedding FLOPs of the updates `0..step` for a depth history (the `runtime::metrics` docs: the compute saved across restarts).
pub fn run_flops_non_embedding(dims: &Dims, history: &BTreeMap<u64, usize>, tokens_per_step: u64, step: u64) -> f64 {
    let h: Vec<(u64, usize)> = history.iter().map(|(a, b)| (*a, *b)).collect();
    let mut total = 0.0;
    for (i, &(from, depth)) in h.iter().enumerate() {
        let to = h.get(i + 1).map_or(step, |h| h.0).min(step);
        if to > from {
            total += flops_per_token_non_embedding(dims, depth) * (tokens_per_step * (to - from)) as f64;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_flops_follow_the_depth_history() {
        let d = Dims::new(256, 16, 32, 2);
        let per = |depth| flops_per_token_non_embedding(&d, depth) * 64.0;
        let h: BTreeMap<u64, usize> = [(0, 0), (10, 4)].into_iter().collect();
        assert_eq!(run_flops_non_embedding(&d, &h, 64, 5), 5.0 * per(0));
        assert_eq!(run_flops_non_embedding(&d, &h, 64, 10), 10.0 * per(0));
        assert_eq!(run_flops_non_embedding(&d, &h, 64, 15), 10.0 * per(0) + 5.0 * per(4));
    }
}
