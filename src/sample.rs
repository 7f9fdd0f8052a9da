//! `taproot sample`: text from a checkpoint, one token at a time with a KV cache, so each new
//! token costs one position (attention over the cached keys and values), not a forward pass over
//! the whole context.
//!
//! It runs on the host in f32 from the checkpoint's weights (GPT-2 blocks in stack order, the
//! tied head), independently of the training backends: the test checks its logits at every
//! position against the CPU backend's full forward. Decoding: temperature (0: greedy), then
//! top-k, then top-p (nucleus) on the renormalised distribution, then a draw from the seeded
//! generator, so a seed gives the same text every time. The context is capped at `max_seq`: a
//! sample longer than that stops there (learned positions do not extend).

use crate::checkpoint::{Checkpoint, UnitKey};
use crate::config::memory::vocab_of;
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

/// One block's weights, row-major as taproot keeps them (a linear layer's weight is (OC, C)).
struct HostBlock {
    p: Vec<f32>,
    layout: crate::params::Layout,
}

impl HostBlock {
    fn get(&self, name: &str) -> &[f32] {
        self.layout.slice(&self.p, name)
    }
}

/// A GPT-2 on the host, for decoding.
pub struct HostModel {
    pub dims: Dims,
    wte: Vec<f32>,
    wpe: Vec<f32>,
    lnf: (Vec<f32>, Vec<f32>),
    blocks: Vec<HostBlock>,
}

/// Keys and values of the positions decoded so far, per layer: (T, C) each.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pub len: usize,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// out (OC) = w (OC, C) · x (C) + b.
fn linear(w: &[f32], b: &[f32], x: &[f32]) -> Vec<f32> {
    let c = x.len();
    w.chunks_exact(c).zip(b).map(|(row, bias)| dot(row, x) + bias).collect()
}

fn layernorm(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let r = 1.0 / (var + 1e-5).sqrt();
    x.iter().zip(w).zip(b).map(|((v, w), b)| (v - mean) * r * w + b).collect()
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
}

impl HostModel {
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<HostModel> {
        let cfg = ck.meta.config().context("the checkpoint's config")?;
        let dims = crate::train::dims_of(&cfg, vocab_of(&cfg.data.tokenizer));
        let c = dims.channels;
        let embed = ck.unit(UnitKey::Embed).context("the checkpoint has no embedding unit")?;
        let head = ck.unit(UnitKey::Head).context("the checkpoint has no head unit")?;
        let (nwte, nwpe) = (dims.padded_vocab * c, dims.max_seq * c);
        if embed.params.len() != nwte + nwpe || head.params.len() != 2 * c {
            bail!("the checkpoint's embedding or head does not match its config");
        }
        let layout = Block::<crate::backend::cpu::CpuBackend>::layout(&dims);
        let mut blocks = Vec::new();
        for id in &ck.meta.stack {
            let u = ck.unit(UnitKey::Layer(*id)).with_context(|| format!("the checkpoint has no unit for layer {id}"))?;
            if u.params.len() != layout.total {
                bail!("layer {id} does not match the config's block size");
            }
            blocks.push(HostBlock { p: u.params.clone(), layout: layout.clone() });
        }
        Ok(HostModel {
            dims,
            wte: embed.params[..nwte].to_vec(),
            wpe: embed.params[nwte..].to_vec(),
            lnf: (head.params[..c].to_vec(), head.params[c..].to_vec()),
            blocks,
        })
    }

    pub fn cache(&self) -> KvCache {
        let cap = self.dims.max_seq * self.dims.channels;
        KvCache { k: vec![Vec::with_capacity(cap); self.blocks.len()], v: vec![Vec::with_capacity(cap); self.blocks.len()], len: 0 }
    }

    /// Feed `token` at the next position; the logits (V) of the token after it.
    pub fn step(&self, cache: &mut KvCache, token: u32) -> Result<Vec<f32>> {
        let (c, nh, t) = (self.dims.channels, self.dims.heads, cache.len);
        let hs = c / nh;
        if t >= self.dims.max_seq {
            bail!("the context is full: the model has {} positions", self.dims.max_seq);
        }
        if token as usize >= self.dims.vocab {
            bail!("token {token} is outside the vocabulary of {}", self.dims.vocab);
        }
        let tok = token as usize;
        let mut x: Vec<f32> = (0..c).map(|i| self.wte[tok * c + i] + self.wpe[t * c + i]).collect();
        let scale = 1.0 / (hs as f32).sqrt();
        for (l, b) in self.blocks.iter().enumerate() {
            let h = layernorm(&x, b.get("ln1w"), b.get("ln1b"));
            let qkv = linear(b.get("qkvw"), b.get("qkvb"), &h);
            cache.k[l].extend_from_slice(&qkv[c..2 * c]);
            cache.v[l].extend_from_slice(&qkv[2 * c..]);
            let mut y = vec![0.0f32; c];
            for head in 0..nh {
                let q = &qkv[head * hs..(head + 1) * hs];
                let scores: Vec<f32> = (0..=t).map(|j| dot(q, &cache.k[l][j * c + head * hs..j * c + (head + 1) * hs]) * scale).collect();
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    let v = &cache.v[l][j * c + head * hs..j * c + (head + 1) * hs];
                    for (o, vv) in y[head * hs..(head + 1) * hs].iter_mut().zip(v) {
                        *o += p / z * vv;
                    }
                }
            }
            let a = linear(b.get("attprojw"), b.get("attprojb"), &y);
            let alpha = self.dims.residual;
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += alpha * a);
            let h = layernorm(&x, b.get("ln2w"), b.get("ln2b"));
            let f: Vec<f32> = linear(b.get("fcw"), b.get("fcb"), &h).into_iter().map(gelu).collect();
            let o = linear(b.get("fcprojw"), b.get("fcprojb"), &f);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += alpha * o);
        }
        cache.len += 1;
        let h = layernorm(&x, &self.lnf.0, &self.lnf.1);
        Ok(self.wte[..self.dims.vocab * c].chunks_exact(c).map(|row| dot(row, &h)).collect())
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
            crate::data::bpe::load(&cfg.data.dir).with_context(|| format!("the {} tokenizer of the run", cfg.data.tokenizer))?,
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
    let mut cache = model.cache();
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
