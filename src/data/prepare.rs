//! Turning text files into token shards (`taproot data prepare`).
//!
//! This is the Rust equivalent of llm.c's `dev/data/tinyshakespeare.py`: read documents,
//! tokenize them, concatenate them into one token stream and split it into a validation
//! shard and a training shard in the llm.c format (see [`crate::data::shard`]).
//!
//! Choices, and why:
//! - Each input file is one document. With gpt2 every document is preceded by `<|endoftext|>`
//!   as llm.c does, so the model sees document boundaries. The byte tokenizer has no such
//!   token and documents are simply concatenated.
//! - The validation split is the *tail* of the stream (the last `val_fraction` of tokens),
//!   so it is a contiguous piece of text the model has not seen, not a random scatter of
//!   windows that overlap training text.
//! - Nothing is skipped silently: an unreadable file or (for gpt2) a non-UTF-8 file is an
//!   error naming it, and so is an input that yields no text at all.

use crate::data::shard::write_shard;
use crate::data::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::fmt;
use std::path::{Path, PathBuf};

/// What to tokenize and where to put the shards.
#[derive(Clone, Debug)]
pub struct PrepareArgs {
    /// Text files, or directories whose `*.txt` files (not recursive, sorted by name) are used.
    pub inputs: Vec<PathBuf>,
    /// Directory the shards are written to (created if missing).
    pub out_dir: PathBuf,
    /// Tokenizer name, see [`Tokenizer::from_name`].
    pub tokenizer: String,
    /// Fraction of the token stream (taken from its end) used for validation. Default 0.1.
    pub val_fraction: f64,
    /// File prefix: shards are `<name>_val_000000.bin` and `<name>_train_000001.bin`.
    pub name: String,
    /// Write into a folder that holds another corpus, after moving its shards aside.
    pub overwrite: bool,
}

impl Default for PrepareArgs {
    fn default() -> Self {
        PrepareArgs {
            inputs: Vec::new(),
            out_dir: PathBuf::from("data"),
            tokenizer: "gpt2".to_string(),
            val_fraction: 0.1,
            name: "data".to_string(),
            overwrite: false,
        }
    }
}

/// What [`prepare`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareReport {
    /// Number of input files read.
    pub files: usize,
    /// Tokens written to the training shard.
    pub train_tokens: usize,
    /// Tokens written to the validation shard.
    pub val_tokens: usize,
    /// The shards written: `[val, train]`.
    pub paths: Vec<PathBuf>,
    /// Where another corpus's shards were moved (`overwrite`).
    pub replaced: Option<PathBuf>,
}

impl fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let paths: Vec<String> = self.paths.iter().map(|p| p.display().to_string()).collect();
        write!(
            f,
            "prepared {} files: {} train tokens, {} val tokens -> {}",
            self.files,
            self.train_tokens,
            self.val_tokens,
            paths.join(", ")
        )
    }
}

/// Expands `inputs` into the list of files to read: files as given, directories replaced by
/// their `*.txt` files sorted by name. A path that does not exist is an error.
fn collect_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut txt = Vec::new();
            let entries = std::fs::read_dir(input).with_context(|| format!("reading input directory {}", input.display()))?;
            for entry in entries {
                let path = entry.with_context(|| format!("listing {}", input.display()))?.path();
                if path.is_file() && path.extension().is_some_and(|e| e == "txt") {
                    txt.push(path);
                }
            }
            txt.sort();
            files.extend(txt);
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            bail!("input {} does not exist (or is not a file or directory)", input.display());
        }
    }
    Ok(files)
}

/// Tokenizes one document's raw bytes. `path` is only used for the error message.
fn tokenize_document(tok: &Tokenizer, raw: &[u8], path: &Path) -> Result<Vec<u32>> {
    if raw.is_empty() {
        // An empty file is no document: it gets no EOT either.
        return Ok(Vec::new());
    }
    let mut tokens = Vec::new();
    match tok {
        // Bytes are the tokens; the file need not be valid UTF-8.
        Tokenizer::Bytes => tokens.extend(raw.iter().map(|&b| u32::from(b))),
        Tokenizer::Gpt2(_) => {
            let text = utf8(raw, path, &tok.name())?;
            // Like llm.c: the delimiter comes before each document.
            tokens.extend(tok.eot());
            tokens.extend(tok.encode(text));
        }
        Tokenizer::Bpe { model, .. } => {
            let text = utf8(raw, path, &tok.name())?;
            let m = model.as_ref().ok_or_else(|| anyhow::anyhow!("{}: the BPE is not trained yet (a bug)", path.display()))?;
            tokens.extend(super::bpe::encode(m, text).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?);
        }
    }
    Ok(tokens)
}

/// `raw` as UTF-8, or an error naming the file and the first bad byte.
fn utf8<'a>(raw: &'a [u8], path: &Path, tokenizer: &str) -> Result<&'a str> {
    std::str::from_utf8(raw).map_err(|e| {
        anyhow::anyhow!(
            "{}: not valid UTF-8 (first bad byte at offset {}); the {tokenizer} tokenizer needs UTF-8 text",
            path.display(),
            e.valid_up_to()
        )
    })
}

/// Learn a `bpe:N` tokenizer from the training part of the corpus: the documents' text up to
/// `1 − val_fraction` of its bytes (the validation shard is the tail of the token stream).
fn train_bpe(files: &[PathBuf], raws: &[Vec<u8>], vocab: usize, val_fraction: f64) -> Result<super::bpe::Bpe> {
    let total: usize = raws.iter().map(Vec::len).sum();
    let mut budget = ((1.0 - val_fraction) * total as f64) as usize;
    let mut texts = Vec::new();
    for (path, raw) in files.iter().zip(raws) {
        if budget == 0 {
            break;
        }
        let text = utf8(raw, path, &format!("bpe:{vocab}"))?;
        let mut end = raw.len().min(budget);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        texts.push(&text[..end]);
        budget -= end.min(budget);
    }
    super::bpe::train(&texts, vocab)
}

/// How many of `total` tokens go to validation: `ceil(total * fraction)`, but at least 1
/// and leaving at least 1 for training.
fn val_count(total: usize, fraction: f64) -> usize {
    let n = (total as f64 * fraction).ceil() as usize;
    n.clamp(1, total - 1)
}

/// Reads, tokenizes and splits the inputs, writing `<name>_val_000000.bin` (the last
/// `val_fraction` of the token stream) and `<name>_train_000001.bin` (the rest) to `out_dir`.
pub fn prepare(args: &PrepareArgs) -> Result<PrepareReport> {
    if !(args.val_fraction > 0.0 && args.val_fraction < 1.0) {
        bail!("val_fraction must be strictly between 0 and 1, got {}", args.val_fraction);
    }
    if args.name.is_empty() || args.name.contains(['/', '\\']) {
        bail!("shard name prefix {:?} must be non-empty and contain no path separator", args.name);
    }
    let mut tok = Tokenizer::from_name(&args.tokenizer)?;

    let files = collect_files(&args.inputs)?;
    if files.is_empty() {
        let shown: Vec<String> = args.inputs.iter().map(|p| p.display().to_string()).collect();
        bail!("no input files found (inputs: [{}]; directories contribute their *.txt files)", shown.join(", "));
    }

    // Read sequentially (cheap, and errors come out in a predictable order), then tokenize
    // documents in parallel: BPE is the slow part. `collect` keeps the input order.
    let mut raws = Vec::with_capacity(files.len());
    for path in &files {
        let raw = crate::userfile::read(path, "input", crate::userfile::MEMORY)?;
        raws.push(raw);
    }
    if let Tokenizer::Bpe { vocab, model } = &mut tok {
        *model = Some(Box::new(train_bpe(&files, &raws, *vocab, args.val_fraction)?));
    }
    let docs: Vec<Vec<u32>> =
        files.par_iter().zip(raws.par_iter()).map(|(path, raw)| tokenize_document(&tok, raw, path)).collect::<Result<_>>()?;
    let stream: Vec<u32> = docs.concat();

    if stream.is_empty() {
        bail!("all {} input files are empty: nothing to tokenize", files.len());
    }
    if stream.len() < 2 {
        bail!("input yields only {} token; need at least 2 to split into val and train", stream.len());
    }

    let n_val = val_count(stream.len(), args.val_fraction);
    let split = stream.len() - n_val;
    let (train, val) = stream.split_at(split);

    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("creating output directory {}", args.out_dir.display()))?;
    let replaced = super::record::make_room(&args.out_dir, &args.name, &args.tokenizer, args.overwrite)?;
    let val_path = args.out_dir.join(format!("{}_val_000000.bin", args.name));
    let train_path = args.out_dir.join(format!("{}_train_000001.bin", args.name));
    write_shard(&val_path, val)?;
    write_shard(&train_path, train)?;
    if let Tokenizer::Bpe { model: Some(m), .. } = &tok {
        super::bpe::save(m, &args.out_dir)?;
    }
    let record = super::record::CorpusRecord {
        tokenizer: tok.name(),
        vocab: tok.vocab_size(),
        name: args.name.clone(),
        train_tokens: train.len(),
        val_tokens: val.len(),
    };
    record.write(&args.out_dir)?;

    Ok(PrepareReport { files: files.len(), train_tokens: train.len(), val_tokens: val.len(), paths: vec![val_path, train_path], replaced })
}

#[cfg(test)]
mod tests {
    use super::val_count;

    #[test]
    fn val_count_bounds() {
        assert_eq!(val_count(100, 0.1), 10);
        assert_eq!(val_count(5, 0.1), 1); // ceil(0.5) = 1
        assert_eq!(val_count(2, 0.9), 1); // leaves one token for training
    }
}
