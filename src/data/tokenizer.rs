//! Tokenizers: text <-> token ids.
//!
//! Two tokenizers are supported, chosen by name in the run configuration:
//!
//! - `"bytes"`: every byte of the UTF-8 text is one token (vocab 256). No merges, no special
//!   tokens. Useful for tiny smoke-test runs where a 50k-row embedding would dominate the model.
//! - `"gpt2"`: GPT-2's byte-level BPE (`r50k_base`, vocab 50257), the tokenizer llm.c and the
//!   original GPT-2 use. Token 50256 is `<|endoftext|>`, which llm.c prepends to every
//!   document so the model learns where documents start.
//!
//! - `"hf:PATH"`: a Hugging Face `tokenizer.json` (or a folder with one), see
//!   [`super::hf_tokenizer`].
//!
//! The GPT-2 BPE tables take a noticeable time to build, so they are built once in
//! [`Tokenizer::from_name`] and kept inside the enum; encode/decode calls are then cheap.

use anyhow::{bail, Result};
use tiktoken_rs::CoreBPE;

/// Vocabulary size of the byte tokenizer: one token per possible byte value.
pub const BYTES_VOCAB: usize = 256;
/// Vocabulary size of GPT-2's BPE (50000 merges + 256 bytes + `<|endoftext|>`).
pub const GPT2_VOCAB: usize = 50257;
/// GPT-2's `<|endoftext|>` token, used as a document delimiter.
pub const GPT2_EOT: u32 = 50256;
/// The names [`Tokenizer::from_name`] accepts, in the order error messages list them.
pub const TOKENIZER_NAMES: &[&str] = &["bytes", "gpt2", "bpe:N", "hf:PATH"];

/// A tokenizer, selected by name. See the module docs for what each variant does.
#[derive(Clone)]
pub enum Tokenizer {
    /// One token per byte; vocab 256; no end-of-text token.
    Bytes,
    /// GPT-2 BPE. Boxed because `CoreBPE` is large (its merge tables live on the heap anyway,
    /// but the struct itself carries per-thread regex caches).
    Gpt2(Box<CoreBPE>),
    /// A byte-level BPE of `vocab` tokens learnt from the corpus (`bpe:N`, see [`super::bpe`]);
    /// its merges once trained or loaded (`data prepare`), else only its size (training reads
    /// token ids, never text).
    Bpe { vocab: usize, model: Option<Box<super::bpe::Bpe>> },
    /// A Hugging Face `tokenizer.json` (`hf:PATH`, see [`super::hf_tokenizer`]), with the path
    /// as the config gave it.
    Hf { path: String, model: Box<super::hf_tokenizer::HfTokenizer> },
}

impl std::fmt::Debug for Tokenizer {
    // `CoreBPE` has no `Debug`; printing its tables would be useless anyway.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({})", self.name())
    }
}

impl Tokenizer {
    /// Builds the tokenizer called `name` (`"bytes"` or `"gpt2"`).
    ///
    /// An unknown name is an error that lists the valid names, so a typo in a config file
    /// is reported at startup rather than as a confusing shape mismatch later.
    pub fn from_name(name: &str) -> Result<Tokenizer> {
        match name {
            "bytes" => Ok(Tokenizer::Bytes),
            "gpt2" => {
                let bpe = tiktoken_rs::r50k_base().map_err(|e| anyhow::anyhow!("building the gpt2 (r50k_base) tokenizer: {e}"))?;
                Ok(Tokenizer::Gpt2(Box::new(bpe)))
            }
            other if other.starts_with("hf:") => {
                let path = &other[3..];
                if path.is_empty() {
                    bail!("`hf:` needs a path: `hf:PATH` names a tokenizer.json or a folder holding one");
                }
                let model = super::hf_tokenizer::HfTokenizer::load(std::path::Path::new(path))?;
                Ok(Tokenizer::Hf { path: path.to_string(), model: Box::new(model) })
            }
            other => match super::bpe::parse_name(other) {
                Some(vocab) => Ok(Tokenizer::Bpe { vocab: vocab?, model: None }),
                None => bail!("unknown tokenizer {other:?}; valid names are: {}", TOKENIZER_NAMES.join(", ")),
            },
        }
    }

    /// The name this tokenizer was built from (round-trips through [`Tokenizer::from_name`]).
    pub fn name(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes".into(),
            Tokenizer::Gpt2(_) => "gpt2".into(),
            Tokenizer::Bpe { vocab, .. } => format!("bpe:{vocab}"),
            Tokenizer::Hf { path, .. } => format!("hf:{path}"),
        }
    }

    /// The digest of an `hf:` tokenizer's file, by which shards and runs are matched.
    pub fn digest(&self) -> Option<&str> {
        match self {
            Tokenizer::Hf { model, .. } => Some(&model.digest),
            _ => None,
        }
    }

    /// Number of distinct token ids; every id produced by `encode` is below this.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => BYTES_VOCAB,
            Tokenizer::Gpt2(_) => GPT2_VOCAB,
            Tokenizer::Bpe { vocab, .. } => *vocab,
            Tokenizer::Hf { model, .. } => model.vocab,
        }
    }

    /// The end-of-text (document delimiter) token, if this tokenizer has one.
    pub fn eot(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes | Tokenizer::Bpe { .. } => None,
            Tokenizer::Gpt2(_) => Some(GPT2_EOT),
            Tokenizer::Hf { model, .. } => model.eos,
        }
    }

    /// Encodes `text` to token ids.
    ///
    /// For gpt2 this is "ordinary" encoding, as in llm.c's data scripts: a literal
    /// `<|endoftext|>` inside the text is encoded as plain characters, never as the special
    /// token, so only the delimiters we insert ourselves are EOT tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Bytes => text.bytes().map(u32::from).collect(),
            Tokenizer::Gpt2(bpe) => bpe.encode_ordinary(text),
            // A byte-level BPE encodes any text; without its merges (a name only) it has none.
            Tokenizer::Bpe { model: Some(m), .. } => super::bpe::encode(m, text).unwrap_or_default(),
            Tokenizer::Bpe { model: None, .. } => Vec::new(),
            Tokenizer::Hf { model, .. } => model.encode_plain(text),
        }
    }

    /// Decodes token ids back to text.
    ///
    /// Never fails: invalid UTF-8 (e.g. a window that starts in the middle of a multi-byte
    /// character) and ids outside the vocabulary become U+FFFD, because decoding is used
    /// for printing samples, where a best-effort string is more useful than an error.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes = self.decode_bytes(ids);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Decodes to raw bytes; unknown ids become the UTF-8 encoding of U+FFFD.
    fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();
        match self {
            Tokenizer::Bytes => {
                let mut out = Vec::with_capacity(ids.len());
                for &id in ids {
                    match u8::try_from(id) {
                        Ok(b) => out.push(b),
                        Err(_) => out.extend_from_slice(REPLACEMENT),
                    }
                }
                out
            }
            Tokenizer::Hf { model, .. } => match model.decode(ids) {
                Some(text) => text.into_bytes(),
                None => {
                    ids.iter().flat_map(|&i| model.decode(&[i]).map(String::into_bytes).unwrap_or_else(|| REPLACEMENT.to_vec())).collect()
                }
            },
            Tokenizer::Bpe { model, .. } => match model.as_ref().map(|m| super::bpe::decode(m, ids)) {
                Some(Ok(text)) => text.into_bytes(),
                _ => REPLACEMENT.repeat(ids.len()),
            },
            Tokenizer::Gpt2(bpe) => {
                // Fast path: all ids known. Otherwise decode one id at a time so one bad id
                // does not lose the rest of the text.
                if let Ok(bytes) = bpe.decode_bytes(ids) {
                    return bytes;
                }
                let mut out = Vec::with_capacity(ids.len() * 2);
                for &id in ids {
                    match bpe.decode_bytes(&[id]) {
                        Ok(bytes) => out.extend_from_slice(&bytes),
                        Err(_) => out.extend_from_slice(REPLACEMENT),
                    }
                }
                out
            }
        }
    }
}
