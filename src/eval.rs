//! `taproot eval`: the loss and perplexity of a model on given tokens or text, so that a model's
//! loss can be compared with any other tool's on the same text.
//!
//! The model is a checkpoint (a file, a folder of them, or a run folder) or a Hugging Face
//! folder (`taproot export`'s, or one `save_pretrained` wrote in a layout taproot reads). The
//! data is a folder of shards (its validation split, or `--split train`), one `.bin` shard, or a
//! text or JSONL file tokenized with the model's own tokenizer (documents joined as
//! `data prepare` joins them).
//!
//! The tokens are cut into consecutive windows of `T + 1` tokens that overlap by one (window
//! `k` is `tokens[kT .. kT + T + 1]`, as the run's validation loader does), so every token after
//! the first is predicted exactly once, with the context since its window's start. The loss is
//! the mean negative log-likelihood in nats over those predictions; perplexity is its
//! exponential. Windows are scored in parallel on the host decoder (`taproot sample`'s), in f64
//! sums, so the figure does not depend on the thread count.

use crate::checkpoint::{self, Checkpoint};
use crate::data::input::{collect_files, Documents, InputSpec, Item};
use crate::data::{Dataset, Tokens};
use crate::sample::HostModel;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::Path;

/// What `taproot eval` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Mean negative log-likelihood per predicted token, in nats.
    pub loss: f64,
    pub perplexity: f64,
    /// Tokens predicted.
    pub tokens: usize,
    pub windows: usize,
    /// Window length T.
    pub seq_len: usize,
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loss {:.6} nats/token, perplexity {:.4}, over {} predicted tokens ({} windows of T={})",
            self.loss, self.perplexity, self.tokens, self.windows, self.seq_len
        )
    }
}

/// A checkpoint (file, folder, run folder) or a Hugging Face folder, as a checkpoint.
pub fn load_model(path: &Path) -> Result<Checkpoint> {
    if path.join("config.json").is_file() && path.join("model.safetensors").is_file() {
        let cfg = crate::export::config_of_folder(path)?;
        crate::export::import(path, &cfg, crate::data::LoaderState::default())
    } else {
        checkpoint::load_file_or_newest(path)
    }
}

/// The tokens at `data` for a model of config `cfg`: see the module docs.
pub fn tokens_of(data: &Path, cfg: &crate::config::Config, split_train: bool, field: &str) -> Result<Tokens> {
    let vocab = crate::config::memory::vocab_of(&cfg.data);
    if data.is_dir() {
        let ds = Dataset::open(data, vocab).with_context(|| format!("the shards of {}", data.display()))?;
        return Ok(if split_train { ds.train().clone() } else { ds.val });
    }
    if data.extension().is_some_and(|e| e == "bin") {
        return Ok(Tokens::shards(vec![crate::data::open_shard(data, vocab)?]));
    }
    let tok = crate::sample::tokenizer_of(cfg)?;
    let files = collect_files(&[data.to_path_buf()])?;
    let mut out = Vec::new();
    let spec = InputSpec { field: field.to_string(), column: field.to_string() };
    for item in Documents::new(files, spec) {
        match item? {
            Item::Bad { at, why } => bail!("{at}: {why}"),
            Item::Doc { bytes, at } if !bytes.is_empty() => {
                out.extend(crate::data::prepare::tokenize_document(&tok, &bytes).map_err(|why| anyhow::anyhow!("{at}: {why}"))?)
            }
            Item::Doc { .. } => {}
        }
    }
    if let Some(&bad) = out.iter().find(|&&t| t as usize >= vocab) {
        bail!("the tokenizer gave id {bad}, outside the model's vocabulary of {vocab}");
    }
    Ok(Tokens::from(out))
}

/// The loss of `model` on `tokens` in windows of `t` (at most `max_windows` of them).
pub fn evaluate(model: &HostModel, tokens: &Tokens, t: usize, max_windows: usize) -> Result<EvalReport> {
    if t == 0 || t > model.dims.max_seq {
        bail!("the window T = {t} must be 1..={} (the model's positions)", model.dims.max_seq);
    }
    if tokens.len() < 2 {
        bail!("{} tokens: at least 2 are needed to predict one", tokens.len());
    }
    let windows = ((tokens.len() - 1) / t).min(max_windows);
    if windows == 0 {
        bail!("{} tokens are fewer than one window of T+1 = {} (lower --seq-len)", tokens.len(), t + 1);
    }
    let sums: Vec<Result<f64>> = (0..windows)
        .into_par_iter()
        .map(|k| {
            let w = tokens.window(k * t, t + 1)?;
            let mut cache = model.cache_for(t)?;
            let mut nll = 0.0f64;
            for i in 0..t {
                let logits = model.step(&mut cache, w[i])?;
                let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
                nll += lse - logits[w[i + 1] as usize] as f64;
            }
            Ok(nll)
        })
        .collect();
    let mut total = 0.0;
    for s in sums {
        total += s?;
    }
    let n = windows * t;
    let loss = total / n as f64;
    Ok(EvalReport { loss, perplexity: loss.exp(), tokens: n, windows, seq_len: t })
}

/// `taproot eval MODEL --data DATA`.
pub fn eval_command(
    model: &Path,
    data: &Path,
    seq_len: Option<usize>,
    max_windows: usize,
    split_train: bool,
    field: &str,
) -> Result<EvalReport> {
    let ck = load_model(model)?;
    let cfg = ck.meta.config().context("the model's config")?;
    let host = HostModel::from_checkpoint(&ck)?;
    let tokens = tokens_of(data, &cfg, split_train, field)?;
    let t = seq_len.unwrap_or(cfg.data.seq_len.min(host.dims.max_seq));
    evaluate(&host, &tokens, t, max_windows)
}
