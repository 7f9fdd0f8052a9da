//! A byte-level BPE of N tokens trained on the corpus itself (`data.tokenizer = "bpe:N"`,
//! `taproot data prepare --tokenizer bpe:N`), with the Hugging Face `tokenizers` crate.
//!
//! Why: with 256 byte tokens the embedding and head of a small model hold a few percent of its
//! parameters; with a learned vocabulary of N tokens that share grows (towards the ~30% of GPT-2
//! 124M), which is one of the settings in which growing a 0-layer model can pay off.
//!
//! The merges are learnt on the training part of the text only (the leading `1 − val_fraction`
//! of it), so that the validation text is tokenized with a vocabulary that never saw it. The
//! tokenizer is byte-level (every byte has a token, so any text encodes) without a prefix space,
//! so decoding an encoding gives the text back. It is saved beside the shards as
//! `tokenizer.json` (the Hugging Face format), and the shards' record says `bpe:N`.

use anyhow::{anyhow, bail, Result};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::TokenizerImpl;

/// The trained tokenizer (model, pre-tokenizer and decoder all byte-level BPE).
pub type Bpe = TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevel>;

/// The file the tokenizer is saved to, beside the shards.
pub const FILE: &str = "tokenizer.json";

/// The vocabulary size of a `bpe:N` tokenizer name, if it is one (N in 257..=65535: more than
/// the bytes, and ids must fit the shards' u16 tokens).
pub fn parse_name(name: &str) -> Option<Result<usize>> {
    let n = name.strip_prefix("bpe:")?;
    Some(match n.parse::<usize>() {
        Ok(v) if (257..=65535).contains(&v) => Ok(v),
        Ok(v) => Err(anyhow!("`bpe:{v}`: the vocabulary must be 257..=65535 tokens (more than the 256 bytes, and ids fit u16 shards)")),
        Err(_) => Err(anyhow!("`{name}`: expected `bpe:N` with N a number of tokens, like `bpe:4096`")),
    })
}

fn byte_level() -> ByteLevel {
    // no prefix space: decode(encode(text)) == text
    ByteLevel::new(false, true, true)
}

/// Learn a byte-level BPE of at most `vocab` tokens from `texts`.
pub fn train(texts: &[&str], vocab: usize) -> Result<Bpe> {
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok: Bpe = TokenizerImpl::new(BPE::default());
    tok.with_pre_tokenizer(Some(byte_level()));
    tok.with_decoder(Some(byte_level()));
    // Lines are the training sequences (the trainer counts words within each).
    let lines = texts.iter().flat_map(|t| t.lines());
    tok.train(&mut trainer, lines).map_err(|e| anyhow!("training the BPE: {e}"))?;
    Ok(tok)
}

/// Token ids of `text`.
pub fn encode(tok: &Bpe, text: &str) -> Result<Vec<u32>> {
    let enc = tok.encode(text, false).map_err(|e| anyhow!("BPE encoding: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// The text of `ids`.
pub fn decode(tok: &Bpe, ids: &[u32]) -> Result<String> {
    tok.decode(ids, false).map_err(|e| anyhow!("BPE decoding: {e}"))
}

/// Save beside the shards of `dir`.
pub fn save(tok: &Bpe, dir: &Path) -> Result<()> {
    let path = dir.join(FILE);
    tok.save(&path, false).map_err(|e| anyhow!("saving {}: {e}", path.display()))
}

/// Load the tokenizer saved in `dir`.
pub fn load(dir: &Path) -> Result<Bpe> {
    let path = dir.join(FILE);
    if std::fs::symlink_metadata(&path).is_err() {
        bail!("{} does not exist: the shards of {} were not prepared with a bpe:N tokenizer", path.display(), dir.display());
    }
    let bytes = crate::userfile::read(&path, "tokenizer", crate::userfile::TOKENIZER_MAX)?;
    Bpe::from_bytes(&bytes).map_err(|e| anyhow!("loading {}: {e}", path.display()))
}
