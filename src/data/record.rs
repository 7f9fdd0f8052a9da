//! What a folder of shards holds: `taproot data prepare` writes `corpus.json` beside the shards
//! (the tokenizer, its vocabulary, the shards' name prefix and token counts), and the loader
//! refuses shards whose recorded tokenizer is not the config's — byte-level shards trained as
//! GPT-2 tokens would otherwise train silently on a 50k vocabulary with 256 tokens in use.
//! Shards without a record (made by llm.c's scripts) are read as before, checked only against
//! the vocabulary size.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The record's file name in a shard folder.
pub const RECORD: &str = "corpus.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CorpusRecord {
    /// The tokenizer's name (`bytes`, `gpt2`).
    pub tokenizer: String,
    pub vocab: usize,
    /// The shards' file-name prefix (`<name>_train_000001.bin`).
    pub name: String,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// Documents in the corpus (absent in records written before they were counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents: Option<u64>,
    /// For an `hf:` tokenizer, the digest of its file: shards and runs are matched by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_digest: Option<String>,
}

impl CorpusRecord {
    /// The record of `dir`, if it has one.
    pub fn read(dir: &Path) -> Result<Option<CorpusRecord>> {
        let path = dir.join(RECORD);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        let t = crate::userfile::read_to_string(&path, "corpus record", crate::userfile::TEXT_MAX)?;
        serde_json::from_str(&t).map(Some).with_context(|| format!("{} is not a corpus record", path.display()))
    }

    /// Write the record of `dir` (a temporary file renamed into place).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(RECORD);
        let tmp = dir.join(format!(".{RECORD}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }
}

/// Refuse shards of `dir` recorded with another tokenizer than `tok`: by name and vocabulary,
/// and for `hf:` tokenizers by the digest of the file (whatever path each was given by).
pub fn check_tokenizer(dir: &Path, tok: &super::Tokenizer) -> Result<()> {
    let (tokenizer, vocab) = (tok.name(), tok.vocab_size());
    let Some(r) = CorpusRecord::read(dir)? else { return Ok(()) };
    let same = match (r.tokenizer_digest.as_deref(), tok.digest()) {
        (Some(a), Some(b)) => a == b && r.vocab == vocab,
        (None, None) => r.tokenizer == tokenizer && r.vocab == vocab,
        _ => false,
    };
    if !same {
        let digest = |d: Option<&str>| d.map(|d| format!(", file digest {d}")).unwrap_or_default();
        bail!(
            "{} holds shards tokenized with `{}` (vocabulary {}{}), but `data.tokenizer` is `{tokenizer}` (vocabulary {vocab}{}): \
             prepare the corpus with `--tokenizer {tokenizer}` into another folder, or set `data.tokenizer = \"{}\"`",
            dir.display(),
            r.tokenizer,
            r.vocab,
            digest(r.tokenizer_digest.as_deref()),
            digest(tok.digest()),
            r.tokenizer
        );
    }
    Ok(())
}

/// The shard files of `dir` (`*.bin`), sorted.
pub fn shard_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "bin")).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// Before `data prepare` writes the corpus `name` with `tokenizer` into `dir`: refuse when `dir`
/// holds another corpus (shards of another name, or another tokenizer's), unless `overwrite`,
/// which first moves the old shards and record into `dir/replaced-<unix time>/`. Rewriting the
/// same corpus (same name and tokenizer) is allowed: the shards are replaced whole.
pub fn make_room(dir: &Path, name: &str, tokenizer: &str, overwrite: bool) -> Result<Option<PathBuf>> {
    let record = CorpusRecord::read(dir).ok().flatten();
    let shards = shard_files(dir);
    let prefix = format!("{name}_");
    let other_shards: Vec<&PathBuf> =
        shards.iter().filter(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix))).collect();
    let other_tokenizer = record.as_ref().is_some_and(|r| r.tokenizer != tokenizer || r.name != name);
    if other_shards.is_empty() && !other_tokenizer {
        return Ok(None);
    }
    if !overwrite {
        let what = match &record {
            Some(r) => format!("the corpus `{}` ({} tokenizer)", r.name, r.tokenizer),
            None => format!("{} shard(s) of another corpus, e.g. {}", other_shards.len(), other_shards[0].display()),
        };
        bail!(
            "{} already holds {what}: prepare into another folder, or pass `--overwrite` to move the old shards into a \
             `replaced-<time>` folder (nothing is merged)",
            dir.display()
        );
    }
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let aside = dir.join(format!("replaced-{stamp}"));
    std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
    let mut moving: Vec<PathBuf> = shards;
    if dir.join(RECORD).exists() {
        moving.push(dir.join(RECORD));
    }
    for p in moving {
        let to = aside.join(p.file_name().context("a file name")?);
        std::fs::rename(&p, &to).with_context(|| format!("moving {} to {}", p.display(), to.display()))?;
    }
    Ok(Some(aside))
}
