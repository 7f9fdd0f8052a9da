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

/// A model of any block kind on the host, for decoding.
pub struct HostModel {
    pub dims: Dims,
    embed: HostBlock,
    head: HostBlock,
    blocks: Vec<HostBlock>,
}

/// Keys and values of the positions decoded so far, per layer: (T, KV·hd) each.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pub len: usize,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// out (OC) = w (OC, C) · x (C) (+ b).
fn linear(w: &[f32], b: Option<&[f32]>, x: &[f32]) -> Vec<f32> {
    let c = x.len();
    let out = w.chunks_exact(c).map(|row| dot(row, x));
    match b {
        Some(b) => out.zip(b).map(|(o, bias)| o + bias).collect(),
        None => out.collect(),
    }
}

fn layernorm(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let r = 1.0 / (var + 1e-5).sqrt();
    x.iter().zip(w).zip(b).map(|((v, w), b)| (v - mean) * r * w + b).collect()
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let r = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

/// Rotary position `pos` on each head of `x` (heads of `hd`): the training kernels' rotation.
fn rotate(x: &mut [f32], hd: usize, pos: usize, theta: f32) {
    let half = hd / 2;
    for head in x.chunks_exact_mut(hd) {
        for i in 0..half {
            let a = pos as f64 * (theta as f64).powf(-2.0 * i as f64 / hd as f64);
            let (c, s) = (a.cos() as f32, a.sin() as f32);
            let (x0, x1) = (head[i], head[i + half]);
            head[i] = x0 * c - x1 * s;
            head[i + half] = x1 * c + x0 * s;
        }
    }
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// down(silu(gate(x)) · up(x)) with [gate | up] stacked in `gate_up`.
fn swiglu_mlp(gate_up: &[f32], down: &[f32], x: &[f32]) -> Vec<f32> {
    let gu = linear(gate_up, None, x);
    let f = gu.len() / 2;
    let m: Vec<f32> = (0..f).map(|i| silu(gu[i]) * gu[f + i]).collect();
    linear(down, None, &m)
}

/// The mixture of experts at one position: the token's k experts weighted by the router (the
/// training's routing, `model::moe::route`), plus the shared experts.
fn moe_mlp(b: &HostBlock, m: &crate::model::moe::Moe, x: &[f32]) -> Vec<f32> {
    use crate::model::moe::{expert_tensor, route};
    let logits = linear(b.get("routerw"), None, x);
    let bias = b.layout.find("router_bias").map(|_| b.get("router_bias"));
    let r = route(&logits, bias, 1, m.experts, m.top_k, m.routing);
    let mut out = match b.layout.find("shared_gate_upw") {
        Some(_) => swiglu_mlp(b.get("shared_gate_upw"), b.get("shared_downw"), x),
        None => vec![0.0; x.len()],
    };
    for (&e, &w) in r.experts.iter().zip(&r.weights) {
        let y = swiglu_mlp(b.get(expert_tensor(e as usize, "gate_upw")), b.get(expert_tensor(e as usize, "downw")), x);
        out.iter_mut().zip(&y).for_each(|(o, y)| *o += w * y);
    }
    out
}

/// Causal attention of one new position over the cache: query heads `q` (NH·hd), cached keys
/// and values (positions × KV·hd); query head h reads key/value head h / (NH / KV).
fn attend(q: &[f32], k: &[f32], v: &[f32], nh: usize, kv: usize, hd: usize) -> Vec<f32> {
    let (scale, width, group) = (1.0 / (hd as f32).sqrt(), kv * hd, nh / kv);
    let positions = k.len() / width;
    let mut y = vec![0.0f32; nh * hd];
    for head in 0..nh {
        let o = (head / group) * hd;
        let qh = &q[head * hd..(head + 1) * hd];
        let scores: Vec<f32> = (0..positions).map(|j| dot(qh, &k[j * width + o..j * width + o + hd]) * scale).collect();
        let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f32 = e.iter().sum();
        for (j, p) in e.iter().enumerate() {
            let vj = &v[j * width + o..j * width + o + hd];
            for (out, vv) in y[head * hd..(head + 1) * hd].iter_mut().zip(vj) {
                *out += p / z * vv;
            }
        }
    }
    y
}

impl HostModel {
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<HostModel> {
        type Cpu = crate::backend::cpu::CpuBackend;
        let cfg = ck.meta.config().context("the checkpoint's config")?;
        let dims = crate::train::dims_of(&cfg, vocab_of(&cfg.data.tokenizer));
        let unit = |key: UnitKey, what: &str, layout: crate::params::Layout| -> Result<HostBlock> {
            let u = ck.unit(key).with_context(|| format!("the checkpoint has no {what}"))?;
            if u.params.len() != layout.total {
                bail!("the checkpoint's {what} holds {} values, not the {} its config implies", u.params.len(), layout.total);
            }
            Ok(HostBlock { p: u.params.clone(), layout })
        };
        let embed = unit(UnitKey::Embed, "embedding unit", crate::model::Embed::<Cpu>::layout(&dims))?;
        let head = unit(UnitKey::Head, "head unit", crate::model::Head::<Cpu>::layout(&dims))?;
        let blocks = ck
            .meta
            .stack
            .iter()
            .map(|id| {
                let what = format!("unit for layer {id}");
                let len = ck.unit(UnitKey::Layer(*id)).map_or(0, |u| u.params.len());
                let mlp = Block::<Cpu>::mlp_of_len(&dims, len).unwrap_or_default();
                unit(UnitKey::Layer(*id), &what, Block::<Cpu>::layout_of(&dims, mlp))
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
        let wte = self.embed.get("wte");
        let mut x: Vec<f32> = wte[tok * c..(tok + 1) * c].to_vec();
        if d.arch.is_gpt2() {
            x.iter_mut().zip(&self.embed.get("wpe")[t * c..(t + 1) * c]).for_each(|(x, p)| *x += p);
        }
        for (l, b) in self.blocks.iter().enumerate() {
            if d.arch.is_gpt2() {
                self.gpt2_block(b, &mut x, cache, l);
            } else {
                self.llama_block(b, &mut x, cache, l, t);
            }
        }
        cache.len += 1;
        let h = if d.arch.is_gpt2() {
            layernorm(&x, self.head.get("lnfw"), self.head.get("lnfb"))
        } else {
            rmsnorm(&x, self.head.get("normw"), d.norm_eps)
        };
        let w = if d.tied { wte } else { self.head.get("lm_head") };
        Ok(w[..d.vocab * c].chunks_exact(c).map(|row| dot(row, &h)).collect())
    }

    /// A GPT-2 block (layer `l`) at the new position, its two branches added into `x`.
    fn gpt2_block(&self, b: &HostBlock, x: &mut [f32], cache: &mut KvCache, l: usize) {
        let (c, nh, alpha) = (self.dims.channels, self.dims.heads, self.dims.residual);
        let h = layernorm(x, b.get("ln1w"), b.get("ln1b"));
        let qkv = linear(b.get("qkvw"), Some(b.get("qkvb")), &h);
        cache.k[l].extend_from_slice(&qkv[c..2 * c]);
        cache.v[l].extend_from_slice(&qkv[2 * c..]);
        let y = attend(&qkv[..c], &cache.k[l], &cache.v[l], nh, nh, c / nh);
        let a = linear(b.get("attprojw"), Some(b.get("attprojb")), &y);
        x.iter_mut().zip(&a).for_each(|(x, a)| *x += alpha * a);
        let h = layernorm(x, b.get("ln2w"), b.get("ln2b"));
        let f: Vec<f32> = linear(b.get("fcw"), Some(b.get("fcb")), &h).into_iter().map(gelu).collect();
        let o = linear(b.get("fcprojw"), Some(b.get("fcprojb")), &f);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += alpha * o);
    }

    /// A LLaMA-kind block (layer `l`) at position `pos`, its two branches added into `x`.
    fn llama_block(&self, b: &HostBlock, x: &mut [f32], cache: &mut KvCache, l: usize, pos: usize) {
        let d = &self.dims;
        let (nh, kv, hd, alpha) = (d.heads, d.kv_heads, d.head_size(), d.residual);
        let h = rmsnorm(x, b.get("attn_norm"), d.norm_eps);
        let mut qkv = linear(b.get("qkvw"), None, &h);
        let (q, rest) = qkv.split_at_mut(nh * hd);
        let (k, v) = rest.split_at_mut(kv * hd);
        if d.arch == crate::model::Arch::Qwen3 {
            for (heads, w) in [(&mut *q, b.get("q_norm")), (&mut *k, b.get("k_norm"))] {
                for head in heads.chunks_exact_mut(hd) {
                    let n = rmsnorm(head, w, d.norm_eps);
                    head.copy_from_slice(&n);
                }
            }
        }
        rotate(q, hd, pos, d.rope_theta);
        rotate(k, hd, pos, d.rope_theta);
        cache.k[l].extend_from_slice(k);
        cache.v[l].extend_from_slice(v);
        let y = attend(q, &cache.k[l], &cache.v[l], nh, kv, hd);
        let o = linear(b.get("ow"), None, &y);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += alpha * o);
        let h = rmsnorm(x, b.get("mlp_norm"), d.norm_eps);
        let o = match (&d.moe, b.layout.find("routerw")) {
            (Some(m), Some(_)) => moe_mlp(b, m, &h),
            _ => swiglu_mlp(b.get("gate_upw"), b.get("downw"), &h),
        };
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += alpha * o);
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
