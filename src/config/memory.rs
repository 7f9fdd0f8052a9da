//! Every size is bounded before anything is allocated: an estimate of the memory a run needs at
//! its largest (the target depth), checked when the config is loaded against a limit —
//! `run.max_memory` when given, else the host's memory for a run on CPU devices. A config that
//! cannot fit (`channels = 2^40`, a growth to 100,000 blocks, `micro_batches = 2^40`) is an error
//! giving the estimate and the limit, instead of an allocation failure minutes into the run.
//!
//! The estimate, in 4-byte floats (llm.c's layout; `B` batch, `T` sequence, `C` channels, `NH`
//! heads, `Vp` padded vocabulary, `L` target depth, `P` parameters, `M` micro-batches in flight
//! = min(`pipeline.max_in_flight` or L+1, `data.micro_batches`)):
//! - parameters P = Vp·C + T_max·C + 2C + L·(12C² + 13C) for `gpt2` (for the LLaMA kinds: no
//!   T_max·C, Vp·C more for an untied head, and their block size, `flops::block_params`; under
//!   `[model.moe]` every block counted with all its experts), and as many gradients;
//! - optimizer state: P (momentum), P more under AdamW (second moments), and Muon's scratch,
//!   three times the largest matrix;
//! - activations: M micro-batches, each stashing 21·B·T·C (LLaMA kinds: B·T·(5C + 4·NH·hd +
//!   3F), + the raw qkv under QK-norm) + 2·B·NH·T² per block and 2·B·T·Vp in the head;
//! - data held by the step loop: the evaluation batches, one micro-batch of token windows, and
//!   per-micro-batch bookkeeping (32 bytes each).
//!
//! It is an estimate (allocator overheads and the token shards themselves are not in it), meant
//! to catch impossible configs, not to predict the peak to the megabyte.

use super::Config;
use crate::model::kinds::spec::{Positions, Sizes};
use crate::optim::OptimizerKind;
use anyhow::{bail, Result};

/// Bytes of each part of the estimate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub params: f64,
    pub grads: f64,
    pub optimizer: f64,
    pub activations: f64,
    pub data: f64,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.params + self.grads + self.optimizer + self.activations + self.data
    }
}

/// The vocabulary size a tokenizer name implies.
pub fn vocab_of(data: &super::DataConfig) -> usize {
    if let Some(v) = data.vocab_size {
        return v;
    }
    match data.tokenizer.as_str() {
        "gpt2" => 50257,
        other => crate::data::bpe::parse_name(other).and_then(Result::ok).unwrap_or(256),
    }
}

/// The memory `cfg` needs at its target depth (f64 throughout: absurd sizes must not overflow).
pub fn estimate(cfg: &Config) -> Estimate {
    let f = |x: usize| x as f64;
    let v = f(vocab_of(&cfg.data).div_ceil(128) * 128);
    let (c, nh, l) = (f(cfg.model.channels), f(cfg.model.heads), f(cfg.target_depth()));
    let (b, t, tmax) = (f(cfg.data.batch_size), f(cfg.data.seq_len), f(cfg.max_seq()));
    let m = &cfg.model;
    // Per block: parameters, and the floats one micro-batch stashes per token.
    let kind = crate::model::kinds::spec(m.arch);
    let ff = f(m.ffn_hidden.unwrap_or_else(|| crate::model::Dims::default_ffn_hidden(m.channels)));
    let sizes = Sizes {
        c,
        nh,
        kv: f(m.kv_heads.unwrap_or(m.heads)),
        ff,
        moe: m.moe.as_ref().map(|x| (f(x.experts), f(x.top_k), f(x.shared_experts), x.expert_hidden.map_or(ff, f))),
    };
    let (block, act) = kind.memory(&sizes);
    let vocab_mats = if m.tie_embeddings.unwrap_or(kind.tied_by_default()) { 1.0 } else { 2.0 };
    let pos = if kind.positions() == Positions::Learned { tmax } else { 0.0 };
    let params = vocab_mats * v * c + pos * c + 2.0 * c + l * block;
    let adam = matches!(cfg.optim.kind, OptimizerKind::Adamw | OptimizerKind::MuonAdamw);
    let largest = (v * c).max(4.0 * c * c).max(2.0 * c * f(m.ffn_hidden.unwrap_or(0)));
    let optimizer = params * if adam { 2.0 } else { 1.0 } + 3.0 * largest;
    let cap = if cfg.pipeline.max_in_flight == 0 { cfg.target_depth() + 1 } else { cfg.pipeline.max_in_flight };
    let in_flight = f(cap.min(cfg.data.micro_batches).max(1));
    // Attention keeps (B, NH, T, T) probabilities and a scratch of that size, or, flash, (B, NH, T).
    let att = match cfg.kernels.attention {
        crate::backend::Attention::Materialized => 2.0 * b * nh * t * t,
        crate::backend::Attention::Flash => 2.0 * b * nh * t,
    };
    let per_mb = l * (act * b * t + att) + 2.0 * b * t * v;
    let activations = in_flight * per_mb;
    let window = b * (t + 1.0);
    let data_floats = f(cfg.eval.batches) * window + window;
    let bookkeeping = 32.0 * f(cfg.data.micro_batches).max(f(cfg.eval.batches));
    Estimate {
        params: 4.0 * params,
        grads: 4.0 * params,
        optimizer: 4.0 * optimizer,
        activations: 4.0 * activations,
        data: 4.0 * data_floats + bookkeeping,
    }
}

/// The host's memory in bytes (`MemTotal` of `/proc/meminfo`), when it can be read.
pub fn host_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// `run.max_memory` as bytes: a number of bytes, or a number with a unit (`KiB`, `MiB`, `GiB`,
/// `TiB`, or `KB`, `MB`, `GB`, `TB`).
pub fn parse_bytes(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let k = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024.0f64.powi(2),
        "gib" => 1024.0f64.powi(3),
        "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return None,
    };
    (n.is_finite() && n > 0.0).then_some(n * k)
}

fn human(bytes: f64) -> String {
    let gib = bytes / 1024.0f64.powi(3);
    match gib {
        g if g < 1.0 => format!("{:.1} MiB", bytes / 1024.0f64.powi(2)),
        g if g < 1e4 => format!("{g:.2} GiB"),
        g => format!("{g:.3e} GiB"),
    }
}

/// Refuse a config whose estimate exceeds its limit (see the module docs).
pub fn check(cfg: &Config) -> Result<()> {
    let (limit, what) = match &cfg.run.max_memory {
        Some(s) => match parse_bytes(s) {
            Some(b) => (b, "`run.max_memory`".to_string()),
            None => bail!("`run.max_memory` must be bytes, like \"24GiB\" or \"512MiB\", got {s:?}"),
        },
        None => {
            match host_memory() {
                Some(b) if !cfg.on_cuda() => (b, "the host's memory (set `run.max_memory` to change it)".to_string()),
                _ => return Ok(()), // a device's memory is learnt only by opening it
            }
        }
    };
    let e = estimate(cfg);
    if e.total() > limit {
        bail!(
            "the run needs about {} at depth {} (parameters {}, gradients {}, optimizer state {}, activations {}, data {}), \
             more than {} of {what}: reduce `model.channels`, `model.target_depth`, `data.batch_size`, `data.seq_len`, \
             `data.micro_batches` or `eval.batches`",
            human(e.total()),
            cfg.target_depth(),
            human(e.params),
            human(e.grads),
            human(e.optimizer),
            human(e.activations),
            human(e.data),
            human(limit)
        );
    }
    Ok(())
}
