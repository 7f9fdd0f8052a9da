//! `taproot sample`: text from a checkpoint, one token at a time with a KV cache, so each new
//! token costs one position (attention over the cached keys and values), not a forward pass over
//! the whole context.
//!
//! It runs on the host in f32 from the checkpoint's weights (the blocks of the run's kind in
//! stack order, the tied or untied head), independently of the training backends: the test checks its logits at every
//! position against the CPU backend's full forward. Decoding: temperature (0: greedy), then
//! top-k, then top-p (nucleus) on the renormalised distribution, then a draw from the seeded
//! generator, so a seed gives the same text every time. The context is capped at `max_seq`: a
//! sample longer than that stops there (learned positions do not extend, and rotary models are
//! trained on no longer context).

use crate::checkpoint::{Checkpoint, UnitKey};
use crate::config::memory::vocab_of;
use crate::model::embed::EmbedTensors;
use crate::model::head::HeadTensors;
use crate::model::host::{dot, layernorm, rmsnorm};
use crate::model::kinds::{self, spec::HostBlock, spec::KvSlot};
use crate::model::{Block, Dims};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};

/// How to draw tokens.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// New tokens to draw (after the prompt).
    pub tokens: usize,
    /// Softmax temperature; 0 takes the most likely token every time.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl SampleOptions {
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("--temperature must be a finite number ≥ 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// A model of any block kind on the host, for decoding: the embedding's and the head's weights
/// with their tensors' handles, and each block's kind decoder (`KindSpec::host_block`), all
/// row-major as taproot keeps them (a linear layer's weight is (OC, C)).
pub struct HostModel {
    pub dims: Dims,
    embed: (EmbedTensors, Vec<f32>),
    head: (HeadTensors, Vec<f32>),
    blocks: Vec<Box<dyn HostBlock>>,
}

/// Keys and values of the positions decoded so far, per layer: (T, KV·hd) each.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pub len: usize,
}

impl HostModel {
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<HostModel> {
        type Cpu = crate::backend::cpu::CpuBackend;
        let cfg = ck.meta.config().context("the checkpoint's config")?;
        let dims = crate::train::dims_of(&cfg, vocab_of(&cfg.data));
        let unit = |key: UnitKey, what: &str, layout: crate::params::Layout| -> Result<Vec<f32>> {
            let u = ck.unit(key).with_context(|| format!("the checkpoint has no {what}"))?;
            if u.params.len() != layout.total {
                bail!("the checkpoint's {what} holds {} values, not the {} its config implies", u.params.len(), layout.total);
            }
            Ok(u.params.clone())
        };
        let (el, et) = EmbedTensors::new(&dims);
        let (hl, ht) = HeadTensors::new(&dims);
        let embed = (et, unit(UnitKey::Embed, "embedding unit", el)?);
        let head = (ht, unit(UnitKey::Head, "head unit", hl)?);
        let kind = kinds::spec(dims.arch);
        let blocks = ck
            .meta
            .stack
            .iter()
            .map(|id| {
                let what = format!("unit for layer {id}");
                let len = ck.unit(UnitKey::Layer(*id)).map_or(0, |u| u.params.len());
                let mlp = Block::<Cpu>::mlp_of_len(&dims, len).unwrap_or_default();
                let params = unit(UnitKey::Layer(*id), &what, kind.layout(&dims, mlp))?;
                Ok(kind.host_block(&dims, params, mlp))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HostModel { dims, embed, head, blocks })
    }

    /// A KV cache for `positions` positions (at most `max_seq`), reserved up front; an error,
    /// not an allocation abort, when it does not fit in memory.
    pub fn cache_for(&self, positions: usize) -> Result<KvCache> {
        let positions = positions.min(self.dims.max_seq);
        let cap = positions.saturating_mul(self.dims.kv_heads * self.dims.head_size());
        let mut k = Vec::with_capacity(self.blocks.len());
        let mut v = Vec::with_capacity(self.blocks.len());
        for _ in 0..self.blocks.len() {
            for side in [&mut k, &mut v] {
                let mut x: Vec<f32> = Vec::new();
                x.try_reserve_exact(cap).map_err(|_| {
                    anyhow::anyhow!(
                        "a KV cache of {positions} positions ({} bytes per layer and side) does not fit in memory: ask for fewer tokens",
                        4 * cap as u128
                    )
                })?;
                side.push(x);
            }
        }
        Ok(KvCache { k, v, len: 0 })
    }

    /// A KV cache for the model's whole context (`max_seq` positions).
    pub fn cache(&self) -> Result<KvCache> {
        self.cache_for(self.dims.max_seq)
    }

    /// Feed `token` at the next position; the logits (V) of the token after it.
    pub fn step(&self, cache: &mut KvCache, token: u32) -> Result<Vec<f32>> {
        let d = &self.dims;
        let (c, t) = (d.channels, cache.len);
        if t >= d.max_seq {
            bail!("the context is full: the model has {} positions", d.max_seq);
        }
        if token as usize >= d.vocab {
            bail!("token {token} is outside the vocabulary of {}", d.vocab);
        }
        let tok = token as usize;
        let ((et, ep), (ht, hp)) = (&self.embed, &self.head);
        let wte = et.wte.of(ep);
        let mut x: Vec<f32> = wte[tok * c..(tok + 1) * c].to_vec();
        if let Some(wpe) = et.wpe {
            x.iter_mut().zip(&wpe.of(ep)[t * c..(t + 1) * c]).for_each(|(x, p)| *x += p);
        }
        for (l, b) in self.blocks.iter().enumerate() {
            b.step(d, &mut x, KvSlot { k: &mut cache.k[l], v: &mut cache.v[l] }, t);
        }
        cache.len += 1;
        let h = match ht.norm_b {
            Some(bias) => layernorm(&x, ht.norm_w.of(hp), bias.of(hp)),
            None => rmsnorm(&x, ht.norm_w.of(hp), d.norm_eps),
        };
        let w = ht.lm_head.map_or(wte, |m| m.of(hp));
        Ok(w[..d.vocab * c].chunks_exact(c).map(|row| dot(row, &h)).collect())
    }
}

/// Draw the next token from `logits` under `opts`.
pub fn draw(logits: &[f32], opts: &SampleOptions, rng: &mut Rng) -> u32 {
    if opts.temperature == 0.0 {
        return logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    let m = logits[order[0]];
    let mut p: Vec<f64> = order.iter().map(|&i| (((logits[i] - m) / opts.temperature) as f64).exp()).collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    // nucleus: the smallest prefix (by probability) reaching top_p
    let mut acc = 0.0;
    let keep = p.iter().position(|x| {
        acc += x;
        acc >= opts.top_p as f64
    });
    let keep = keep.map_or(p.len(), |i| i + 1);
    let total: f64 = p[..keep].iter().sum();
    let mut u = rng.uniform() * total;
    for (i, x) in p[..keep].iter().enumerate() {
        if u < *x {
            return order[i] as u32;
        }
        u -= x;
    }
    order[keep - 1] as u32
}

/// The tokenizer of a run's config, with a learnt BPE's merges read from beside its shards.
pub fn tokenizer_of(cfg: &crate::config::Config) -> Result<crate::data::Tokenizer> {
    let mut tok = crate::data::Tokenizer::from_name(&cfg.data.tokenizer)?;
    if let crate::data::Tokenizer::Bpe { model, .. } = &mut tok {
        *model = Some(Box::new(
            crate::data::bpe::load(cfg.data.home()).with_context(|| format!("the {} tokenizer of the run", cfg.data.tokenizer))?,
        ));
    }
    Ok(tok)
}

/// The prompt's tokens followed by `opts.tokens` drawn ones (fewer if the context fills up).
pub fn generate(model: &HostModel, prompt: &[u32], opts: &SampleOptions) -> Result<Vec<u32>> {
    opts.check()?;
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token (e.g. one character with the bytes tokenizer)");
    }
    let mut rng = Rng::new(opts.seed);
    let mut cache = model.cache_for(prompt.len().saturating_add(opts.tokens))?;
    let mut out = prompt.to_vec();
    let mut logits = Vec::new();
    for &tok in prompt {
        logits = model.step(&mut cache, tok)?;
    }
    for _ in 0..opts.tokens {
        if cache.len >= model.dims.max_seq {
            break;
        }
        let next = draw(&logits, opts, &mut rng);
        out.push(next);
        logits = model.step(&mut cache, next)?;
    }
    Ok(out)
}
