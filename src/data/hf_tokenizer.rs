//! A Hugging Face tokenizer (`data.tokenizer = "hf:PATH"`, `data prepare --tokenizer hf:PATH`):
//! a `tokenizer.json`, or a folder holding one (a model folder as `save_pretrained` writes it),
//! read by the `tokenizers` crate with its normalizer, pre-tokenizer, model, post-processor and
//! decoder as the file says.
//!
//! **Documents.** A document is encoded with the tokenizer's special tokens
//! (`add_special_tokens = true`, so a post-processor that puts BOS first, as LLaMA's does, puts
//! it first), then followed by the end-of-sequence token when the tokenizer has one and the
//! encoding does not already end with it: documents are joined as `[BOS] text EOS`. The EOS is
//! `eos_token` of a `tokenizer_config.json` beside the file, else the first added special token
//! spelled as one (`<|endoftext|>`, `</s>`, `<|end_of_text|>`, `<eos>`, `<|im_end|>`).
//!
//! **Identity.** The tokenizer is known by a 64-bit digest of its file ([`HfTokenizer::digest`]):
//! the shards' record keeps it, and a run whose tokenizer file differs is refused whatever its
//! path.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// The file a folder's tokenizer lives in.
pub const FILE: &str = "tokenizer.json";

/// Spellings of an end-of-sequence token, tried in order when no `tokenizer_config.json` names one.
const EOS_SPELLINGS: &[&str] = &["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>"];

/// A loaded Hugging Face tokenizer.
#[derive(Clone)]
pub struct HfTokenizer {
    pub inner: tokenizers::Tokenizer,
    /// The `tokenizer.json` it was read from.
    pub file: PathBuf,
    /// Hex digest of the file's bytes.
    pub digest: String,
    /// Ids of every token, added ones included: every id `encode` gives is below it.
    pub vocab: usize,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

/// The `tokenizer.json` that `path` names: the file itself, or the one inside a folder.
pub fn file_of(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let f = path.join(FILE);
        if !f.is_file() {
            bail!("{} holds no {FILE}: a Hugging Face tokenizer is a {FILE} or a folder with one", path.display());
        }
        return Ok(f);
    }
    if !path.exists() {
        bail!("tokenizer {} does not exist (expected a {FILE} or a folder holding one)", path.display());
    }
    Ok(path.to_path_buf())
}

/// A token named in `tokenizer_config.json` (`"eos_token": "</s>"` or `{"content": "</s>", ...}`).
fn config_token(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl HfTokenizer {
    /// Loads the tokenizer at `path` (a `tokenizer.json` or a folder holding one).
    pub fn load(path: &Path) -> Result<HfTokenizer> {
        let file = file_of(path)?;
        let bytes = crate::userfile::read(&file, "tokenizer", crate::userfile::TOKENIZER_MAX)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("{}: not a Hugging Face tokenizer.json this version can read: {e}", file.display()))?;
        let digest = format!("{:016x}", crate::checkpoint::checksum::hash_bytes(&bytes));
        let vocab = inner.get_vocab_size(true);
        if vocab == 0 {
            bail!("{}: the tokenizer has no tokens", file.display());
        }
        // Its configuration, if it sits beside it.
        let cfg_path = file.with_file_name("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.is_file() {
            let t = crate::userfile::read_to_string(&cfg_path, "tokenizer config", crate::userfile::TEXT_MAX)?;
            serde_json::from_str(&t).with_context(|| format!("{} is not JSON", cfg_path.display()))?
        } else {
            serde_json::Value::Null
        };
        let id = |s: &str| inner.token_to_id(s);
        let eos = match config_token(&cfg, "eos_token") {
            Some(t) => Some(id(&t).ok_or_else(|| anyhow!("{}: `eos_token` {t:?} is not in the vocabulary", cfg_path.display()))?),
            None => EOS_SPELLINGS.iter().find_map(|s| id(s)),
        };
        let bos = config_token(&cfg, "bos_token").and_then(|t| id(&t));
        Ok(HfTokenizer { inner, file, digest, vocab, bos, eos })
    }

    /// One document's ids: `[BOS] text EOS` (see the module docs).
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| anyhow!("encoding with {}: {e}", self.file.display()))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(eos) = self.eos {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// Ids of `text` without special tokens (a prompt's continuation).
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        self.inner.encode(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }

    /// The text of `ids`, special tokens spelled out.
    pub fn decode(&self, ids: &[u32]) -> Option<String> {
        self.inner.decode(ids, false).ok()
    }
}
