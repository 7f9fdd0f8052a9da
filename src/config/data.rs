//! The `[data]` section: where the shards are (one folder, or a weighted mixture of folders),
//! the tokenizer, the model's vocabulary, and the batch shape.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Directory holding `*val*.bin` and `*train*.bin` token shards (or `sources`).
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub dir: PathBuf,
    /// A mixture instead of `dir`: `[[data.sources]]` folders of shards, each with a weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceConfig>,
    /// `bytes` or `gpt2`.
    pub tokenizer: String,
    /// B: sequences per micro-batch.
    pub batch_size: usize,
    /// T: tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[serde(default = "one")]
    pub micro_batches: usize,
    /// The model's vocabulary V, when it is not the tokenizer's: at least the tokenizer's
    /// (an imported model's embedding is often padded past its tokenizer's ids). For an `hf:`
    /// tokenizer it is filled in from the tokenizer when the config is read, so a checkpoint
    /// knows its V without the tokenizer file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
}

fn one() -> usize {
    1
}

fn is_empty_path(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

/// One source of a data mixture (`[[data.sources]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A folder of shards prepared with the run's tokenizer.
    pub dir: PathBuf,
    /// Its share of the training windows, relative to the other sources' weights.
    pub weight: f64,
    /// What logs and `/metrics` call it (default: the folder's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl DataConfig {
    /// The training folders as `(name, dir, weight)`: `dir` alone, or the sources in order.
    pub fn folders(&self) -> Vec<(String, PathBuf, f64)> {
        let name_of = |d: &std::path::Path| d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "train".into());
        if self.sources.is_empty() {
            return vec![(name_of(&self.dir), self.dir.clone(), 1.0)];
        }
        self.sources.iter().map(|s| (s.name.clone().unwrap_or_else(|| name_of(&s.dir)), s.dir.clone(), s.weight)).collect()
    }

    /// The folder whose record and tokenizer files speak for the data: `dir`, or the first
    /// source's.
    pub fn home(&self) -> &std::path::Path {
        match self.sources.first() {
            Some(s) if self.dir.as_os_str().is_empty() => &s.dir,
            _ => &self.dir,
        }
    }
}
