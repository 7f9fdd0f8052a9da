//! Batches for training and evaluation, and the on-disk dataset they come from.
//!
//! - [`Dataset`] opens a directory of llm.c shards (or several, a mixture) as one token stream
//!   per split and source ([`Tokens`]); nothing of the corpus is read into the run's memory.
//! - [`Loader`] draws training batches: `B` windows of `T + 1` consecutive tokens at random
//!   start positions (from sources picked by weight, in a mixture) (the first `T` are the inputs, the last `T` the targets). The positions
//!   come from a tiny self-contained PRNG whose whole state is one `u64`, so a run can save
//!   [`LoaderState`] in its checkpoint and resume with bit-identical batches.
//! - [`sequential_batches`] walks the validation stream in order, so every evaluation sees
//!   exactly the same tokens and losses are comparable across steps and runs.

use crate::data::shard::{open_shard, ShardFile};
use crate::data::tokens::Tokens;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// splitmix64: one `u64` of state, good statistical quality, trivially serialisable.
/// Written out here (rather than using a crate) so the batch sequence can never change
/// under us with a dependency upgrade.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform integer in `[0, n)` (`n > 0`), without modulo bias: draws that fall in the
/// incomplete last block of size `2^64 mod n` are rejected and redrawn.
fn uniform_below(state: &mut u64, n: u64) -> u64 {
    debug_assert!(n > 0);
    let zone = u64::MAX - (u64::MAX % n); // largest multiple of n, as an exclusive bound
    loop {
        let x = splitmix64(state);
        if x < zone {
            return x % n;
        }
    }
}

/// Everything needed to resume a [`Loader`] exactly where it stopped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoaderState {
    /// The PRNG state after the last drawn batch.
    pub rng: u64,
    /// How many batches have been drawn so far (for logging and sanity checks).
    pub batches: u64,
    /// Tokens trained on (T per window) from each source of a mixture, in the config's order.
    /// Empty in checkpoints written before mixtures existed (then all came from one source).
    #[serde(default)]
    pub source_tokens: Vec<u64>,
}

/// Random-window training batch loader over one token stream, or a weighted mixture of several
/// (`[[data.sources]]`).
#[derive(Clone, Debug)]
pub struct Loader {
    sources: Vec<Tokens>,
    /// Running sums of the sources' weights (the last is the total).
    cum: Vec<f64>,
    b: usize,
    t: usize,
    state: LoaderState,
}

impl Loader {
    /// A loader yielding batches of `b` windows of `t + 1` tokens from `tokens`.
    ///
    /// `seed` fully determines the batch sequence. Errors if `b` or `t` is zero or if the
    /// stream is shorter than one window (`t + 1` tokens).
    pub fn new(tokens: impl Into<Tokens>, b: usize, t: usize, seed: u64) -> Result<Loader> {
        Loader::mixture(vec![("train".into(), 1.0, tokens.into())], b, t, seed)
    }

    /// The training loader of `data`: its one source, or its sources drawn by weight.
    pub fn of(data: &Dataset, b: usize, t: usize, seed: u64) -> Result<Loader> {
        Loader::mixture(data.sources.iter().map(|s| (s.name.clone(), s.weight, s.train.clone())).collect(), b, t, seed)
    }

    /// A loader over `(name, weight, tokens)` sources. Each window first picks its source with
    /// probability proportional to its weight, then a uniform start within it; with one source
    /// no pick is drawn, so a single-source run's batches are those of [`Loader::new`].
    pub fn mixture(sources: Vec<(String, f64, Tokens)>, b: usize, t: usize, seed: u64) -> Result<Loader> {
        if b == 0 || t == 0 {
            bail!("loader needs B >= 1 and T >= 1, got B={b}, T={t}");
        }
        if sources.is_empty() {
            bail!("a loader needs at least one source of tokens");
        }
        let mut cum = Vec::with_capacity(sources.len());
        let mut total = 0.0;
        for (name, w, tokens) in &sources {
            if tokens.len() < t + 1 {
                bail!("token stream of {name} has {} tokens, fewer than one window of T+1 = {} tokens (T={t})", tokens.len(), t + 1);
            }
            if !(w.is_finite() && *w > 0.0) {
                bail!("the weight of source {name} must be a positive number, got {w}");
            }
            total += w;
            cum.push(total);
        }
        let state = LoaderState { rng: seed, batches: 0, source_tokens: vec![0; sources.len()] };
        Ok(Loader { sources: sources.into_iter().map(|s| s.2).collect(), cum, b, t, state })
    }

    /// Batch size B (windows per batch).
    pub fn batch_size(&self) -> usize {
        self.b
    }

    /// Sequence length T (each window holds T + 1 tokens).
    pub fn seq_len(&self) -> usize {
        self.t
    }

    /// Fills `out` with the next batch: `B * (T + 1)` tokens, row-major, row `r` being the
    /// contiguous window `tokens[s_r .. s_r + T + 1]` of its source with `s_r` uniform in
    /// `[0, len - (T + 1)]`. `out` is cleared first so callers can reuse one buffer. An error
    /// only if a shard cannot be read (changed or truncated under the run).
    pub fn next_batch(&mut self, out: &mut Vec<u32>) -> Result<()> {
        let window = self.t + 1;
        out.clear();
        out.reserve(self.b * window);
        for _ in 0..self.b {
            let k = if self.sources.len() == 1 {
                0
            } else {
                // 53 random bits as a uniform in [0, total).
                let u = (splitmix64(&mut self.state.rng) >> 11) as f64 / (1u64 << 53) as f64 * self.cum[self.cum.len() - 1];
                self.cum.iter().position(|&c| u < c).unwrap_or(self.cum.len() - 1)
            };
            let tokens = &self.sources[k];
            // Number of valid start positions: starts 0 ..= len - window.
            let n_starts = (tokens.len() - window + 1) as u64;
            let start = uniform_below(&mut self.state.rng, n_starts) as usize;
            tokens.read_into(start, window, out)?;
            self.state.source_tokens[k] += self.t as u64;
        }
        self.state.batches += 1;
        Ok(())
    }

    /// The current position, to store in a checkpoint.
    pub fn cursor(&self) -> LoaderState {
        self.state.clone()
    }

    /// Resumes from a saved position: the following `next_batch` calls return exactly what
    /// they would have returned in the run that saved `st`.
    pub fn restore(&mut self, st: &LoaderState) {
        let n = self.sources.len();
        self.state = st.clone();
        if self.state.source_tokens.len() != n {
            // A checkpoint from before mixtures: every token came from the one source.
            let seen = if n == 1 { st.batches * (self.b * self.t) as u64 } else { 0 };
            self.state.source_tokens = vec![0; n];
            self.state.source_tokens[0] = seen;
        }
    }
}

/// Iterator over consecutive evaluation batches; see [`sequential_batches`].
#[derive(Clone, Debug)]
pub struct SequentialBatches {
    tokens: Tokens,
    b: usize,
    t: usize,
    next: usize,
    count: usize,
}

/// How many full sequential batches of `b` windows of `t + 1` tokens `len` tokens hold.
/// Windows advance by `t` (see [`sequential_batches`]), so `n` batches need `n*b*t + 1` tokens.
pub fn num_sequential_batches(len: usize, b: usize, t: usize) -> usize {
    if b == 0 || t == 0 || len == 0 {
        return 0;
    }
    (len - 1) / (b * t)
}

/// The evaluation batches of `tokens`, in order, at most `max_batches` of them.
///
/// Window `k` (counting across batches) is `tokens[k*T .. k*T + T + 1]`: the inputs of
/// consecutive windows do not overlap and each token is predicted exactly once, as in llm.c's
/// validation loader (a window's last token is the next window's first input). Each item is a
/// `B * (T + 1)` row-major batch like [`Loader::next_batch`] produces. The sequence is the
/// same every time; a partial batch at the end is dropped. Check [`ExactSizeIterator::len`]
/// to detect a validation set too small for even one batch.
pub fn sequential_batches(tokens: &Tokens, b: usize, t: usize, max_batches: usize) -> SequentialBatches {
    let count = num_sequential_batches(tokens.len(), b, t).min(max_batches);
    SequentialBatches { tokens: tokens.clone(), b, t, next: 0, count }
}

impl Iterator for SequentialBatches {
    type Item = Result<Vec<u32>>;

    fn next(&mut self) -> Option<Result<Vec<u32>>> {
        if self.next >= self.count {
            return None;
        }
        let window = self.t + 1;
        let mut out = Vec::with_capacity(self.b * window);
        for r in 0..self.b {
            let start = (self.next * self.b + r) * self.t;
            if let Err(e) = self.tokens.read_into(start, window, &mut out) {
                return Some(Err(e));
            }
        }
        self.next += 1;
        Some(Ok(out))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.count - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for SequentialBatches {}

/// One source of training tokens: a folder of shards and its weight in the mixture.
#[derive(Clone, Debug)]
pub struct Source {
    /// What logs and `/metrics` call it (the config's `name`, else the folder's name).
    pub name: String,
    pub weight: f64,
    pub train: Tokens,
}

/// A tokenized dataset: the training sources, the validation stream (every source's validation
/// shards, in source order) and the vocabulary they were checked against.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub sources: Vec<Source>,
    pub val: Tokens,
    pub vocab: usize,
}

/// Which split a shard file belongs to, judged from its name (llm.c naming:
/// `<name>_val_000000.bin`, `<name>_train_000001.bin`, ...).
fn classify_shard(file_name: &str) -> Option<Split> {
    let stem = file_name.strip_suffix(".bin")?;
    // Whole words first, so `interval_train_000001.bin` is training data.
    let words: Vec<&str> = stem.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    if words.contains(&"val") {
        return Some(Split::Val);
    }
    if words.contains(&"train") {
        return Some(Split::Train);
    }
    if stem.contains("val") {
        return Some(Split::Val);
    }
    if stem.contains("train") {
        return Some(Split::Train);
    }
    // Neither word: fall back to llm.c's convention that shard index 0 is validation.
    let (_, index) = stem.rsplit_once('_')?;
    if index.is_empty() || !index.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if index.bytes().all(|c| c == b'0') {
        Some(Split::Val)
    } else {
        Some(Split::Train)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Split {
    Train,
    Val,
}

impl Dataset {
    /// A dataset of one source held in memory (tests, benchmarks, synthetic data).
    pub fn in_memory(train: impl Into<Tokens>, val: impl Into<Tokens>, vocab: usize) -> Dataset {
        Dataset { sources: vec![Source { name: "train".into(), weight: 1.0, train: train.into() }], val: val.into(), vocab }
    }

    /// The first (with one source, the only) source's training stream.
    pub fn train(&self) -> &Tokens {
        &self.sources[0].train
    }

    /// Training tokens over all sources.
    pub fn train_tokens(&self) -> usize {
        self.sources.iter().map(|s| s.train.len()).sum()
    }

    /// [`Dataset::open`] for a run whose config names `tokenizer`: shards recorded with another
    /// tokenizer are refused (see [`super::record`]).
    pub fn open_for(dir: &Path, tokenizer: &super::Tokenizer) -> Result<Dataset> {
        super::record::check_tokenizer(dir, tokenizer)?;
        Dataset::open(dir, tokenizer.vocab_size())
    }

    /// The data of a run's `[data]` section: `dir`, or the `[[data.sources]]` mixture, each
    /// folder checked against the tokenizer's record.
    pub fn open_config(data: &crate::config::DataConfig, tokenizer: &super::Tokenizer) -> Result<Dataset> {
        // The model's vocabulary (an imported model's may have more ids than its tokenizer); a
        // token at or above it is refused when the shard is opened.
        let vocab = crate::config::memory::vocab_of(data);
        let mut sources = Vec::new();
        let mut val = Vec::new();
        for (name, dir, weight) in data.folders() {
            super::record::check_tokenizer(&dir, tokenizer)?;
            let (train, v) = open_splits(&dir, vocab)?;
            sources.push(Source { name, weight, train: Tokens::shards(train) });
            val.extend(v);
        }
        Ok(Dataset { sources, val: Tokens::shards(val), vocab })
    }

    /// Opens every shard in `dir` (not recursively). A `.bin` file whose name contains `val`
    /// is validation, one containing `train` is training; failing both, a name ending in
    /// `_<digits>` is validation for index 0 and training otherwise. Other files are ignored.
    /// Shards of one split are concatenated in file-name order.
    ///
    /// Every shard is checked against `vocab`. Errors (naming `dir`) if there is no
    /// validation shard or no training shard.
    pub fn open(dir: &Path, vocab: usize) -> Result<Dataset> {
        let (train, val) = open_splits(dir, vocab)?;
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "train".into());
        Ok(Dataset { sources: vec![Source { name, weight: 1.0, train: Tokens::shards(train) }], val: Tokens::shards(val), vocab })
    }
}

/// The open training and validation shards of `dir`; see [`Dataset::open`].
fn open_splits(dir: &Path, vocab: usize) -> Result<(Vec<ShardFile>, Vec<ShardFile>)> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading dataset directory {}", dir.display()))?;
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !path.is_file() {
            // Named like a shard but a FIFO, device or folder: said, not skipped in silence.
            if classify_shard(name).is_some() {
                crate::userfile::check(&path, "shard")?;
            }
            continue;
        }
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            files.push((name.to_string(), path.clone()));
        }
    }
    files.sort();

    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (name, path) in &files {
        let split = match classify_shard(name) {
            Some(s) => s,
            None => continue,
        };
        let shard = open_shard(path, vocab)?;
        match split {
            Split::Train => train.push(shard),
            Split::Val => val.push(shard),
        }
    }
    if val.is_empty() {
        bail!("no validation shard in {} (expected a file like <name>_val_000000.bin)", dir.display());
    }
    if train.is_empty() {
        bail!("no training shard in {} (expected a file like <name>_train_000001.bin)", dir.display());
    }
    Ok((train, val))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names() {
        assert_eq!(classify_shard("tiny_val_000000.bin"), Some(Split::Val));
        assert_eq!(classify_shard("tiny_train_000001.bin"), Some(Split::Train));
        assert_eq!(classify_shard("fineweb_000000.bin"), Some(Split::Val));
        assert_eq!(classify_shard("fineweb_000003.bin"), Some(Split::Train));
        assert_eq!(classify_shard("interval_train_000001.bin"), Some(Split::Train));
        assert_eq!(classify_shard("tinyshakespeare_val.bin"), Some(Split::Val));
        assert_eq!(classify_shard("model.bin"), None);
        assert_eq!(classify_shard("notes.txt"), None);
    }

    #[test]
    fn uniform_covers_range() {
        let mut s = 7;
        let mut seen = [false; 5];
        for _ in 0..200 {
            seen[uniform_below(&mut s, 5) as usize] = true;
        }
        assert!(seen.iter().all(|&x| x));
    }
}
