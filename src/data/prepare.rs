//! Turning documents into token shards (`taproot data prepare`).
//!
//! The Rust counterpart of llm.c's `dev/data/*.py` scripts and of a Hugging Face `datasets` map:
//! read documents ([`super::input`]: text files, JSONL with `--field`, Parquet with `--column`),
//! tokenize them on every core, and write llm.c shards of at most `shard_tokens` tokens each
//! (`<name>_val_000000.bin`, `<name>_train_000001.bin`, `<name>_train_000002.bin`, ...).
//!
//! Choices, and why:
//! - **Streamed.** Documents are read in chunks of a few tens of MB, each chunk tokenized in
//!   parallel and written before the next is read, so peak memory does not grow with the input.
//!   A document's tokens depend on it alone and chunks are written in input order, so the shards
//!   are the same for any thread count.
//! - **Documents.** With gpt2 every document is preceded by `<|endoftext|>` as llm.c does; with
//!   `hf:` documents are `[BOS] text EOS` as the tokenizer says (see [`super::hf_tokenizer`]);
//!   `bytes` and `bpe:N` have no such token and documents are simply concatenated.
//! - **Split by document, never inside one.** `--val-docs N` sends the first N documents to
//!   validation (llm.c's convention: shard 0 is validation). `--val-fraction f` sends document
//!   `i` to validation when `⌊(i+1)f⌋ > ⌊if⌋`: every `1/f`-th document, spread over the corpus,
//!   deterministic, decided as it streams. Fewer documents than `1/f` would give no validation
//!   document: then the last document is the validation set (it is held back until the next
//!   arrives). A corpus of one document (the demo's one text file) is split inside it, its tail
//!   `f` of tokens being validation, as before documents were counted; the report says so.
//! - **Nothing skipped silently.** A bad document (a malformed line, a missing field, a non-UTF-8
//!   text for a text tokenizer, a truncated gzip) stops the run naming its file and line or row;
//!   with `skip_bad` it is counted, the first few are named in the report, and the run goes on.
//! - **Crash-safe.** Every shard is written to a temporary name and all are renamed into place
//!   only when the last is complete; shards of the same name left from an earlier preparation
//!   are removed then, so the folder never mixes two preparations.

use super::input::{collect_files, Documents, InputSpec, Item, Location};
use super::shard::{ShardWriter, Width};
use super::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::fmt;
use std::path::{Path, PathBuf};

/// What to tokenize and where to put the shards.
#[derive(Clone, Debug)]
pub struct PrepareArgs {
    /// Files, or directories whose input files (see [`super::input`]) are taken.
    pub inputs: Vec<PathBuf>,
    /// Directory the shards are written to (created if missing).
    pub out_dir: PathBuf,
    /// Tokenizer name, see [`Tokenizer::from_name`].
    pub tokenizer: String,
    /// Fraction of documents for validation (see the module docs). Default 0.1.
    pub val_fraction: f64,
    /// Instead of `val_fraction`: the first this many documents are validation.
    pub val_docs: Option<u64>,
    /// File prefix: shards are `<name>_val_000000.bin` and `<name>_train_000001.bin`, ...
    pub name: String,
    /// Write into a folder that holds another corpus, after moving its shards aside.
    pub overwrite: bool,
    /// Where the text is in JSONL and Parquet inputs.
    pub spec: InputSpec,
    /// Count and skip bad documents instead of stopping.
    pub skip_bad: bool,
    /// Tokens per shard at most (llm.c writes 100M).
    pub shard_tokens: usize,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
}

impl Default for PrepareArgs {
    fn default() -> Self {
        PrepareArgs {
            inputs: Vec::new(),
            out_dir: PathBuf::from("data"),
            tokenizer: "gpt2".to_string(),
            val_fraction: 0.1,
            val_docs: None,
            name: "data".to_string(),
            overwrite: false,
            spec: InputSpec::default(),
            skip_bad: false,
            shard_tokens: 100_000_000,
            progress: false,
        }
    }
}

/// What [`prepare`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareReport {
    /// Number of input files read.
    pub files: usize,
    /// Documents tokenized (empty ones are not documents).
    pub documents: u64,
    /// Of which went to validation.
    pub val_documents: u64,
    /// Bad documents skipped (`skip_bad`), and the first few of them, named.
    pub skipped: u64,
    pub skipped_examples: Vec<String>,
    /// Tokens written to the training shards.
    pub train_tokens: usize,
    /// Tokens written to the validation shards.
    pub val_tokens: usize,
    /// Bytes read from the input files.
    pub input_bytes: u64,
    /// The corpus was one document, split inside it (see the module docs).
    pub split_inside_document: bool,
    /// The shards written: validation first, then training.
    pub paths: Vec<PathBuf>,
    /// Where another corpus's shards were moved (`overwrite`).
    pub replaced: Option<PathBuf>,
}

impl fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let paths: Vec<String> = self.paths.iter().map(|p| p.display().to_string()).collect();
        write!(
            f,
            "prepared {} files, {} documents ({} for validation): {} train tokens, {} val tokens -> {}",
            self.files,
            self.documents,
            self.val_documents,
            self.train_tokens,
            self.val_tokens,
            paths.join(", ")
        )?;
        if self.split_inside_document {
            write!(f, "\n(the corpus is one document: its last {} tokens are the validation set)", self.val_tokens)?;
        }
        if self.skipped > 0 {
            write!(f, "\nskipped {} bad documents, e.g.:\n  {}", self.skipped, self.skipped_examples.join("\n  "))?;
        }
        Ok(())
    }
}

/// Which documents are validation.
#[derive(Clone, Copy, Debug)]
struct SplitRule {
    fraction: f64,
    val_docs: Option<u64>,
}

impl SplitRule {
    fn is_val(&self, i: u64) -> bool {
        match self.val_docs {
            Some(n) => i < n,
            None => ((i + 1) as f64 * self.fraction).floor() > (i as f64 * self.fraction).floor(),
        }
    }
}

/// Tokenizes one document's bytes; the error is why it is not a document.
pub fn tokenize_document(tok: &Tokenizer, raw: &[u8]) -> std::result::Result<Vec<u32>, String> {
    let text = || {
        std::str::from_utf8(raw).map_err(|e| {
            format!("not valid UTF-8 (first bad byte at offset {}); the {} tokenizer needs UTF-8 text", e.valid_up_to(), tok.name())
        })
    };
    Ok(match tok {
        // Bytes are the tokens; the file need not be valid UTF-8.
        Tokenizer::Bytes => raw.iter().map(|&b| u32::from(b)).collect(),
        Tokenizer::Gpt2(_) => {
            // Like llm.c: the delimiter comes before each document.
            let mut tokens: Vec<u32> = tok.eot().into_iter().collect();
            tokens.extend(tok.encode(text()?));
            tokens
        }
        Tokenizer::Bpe { model, .. } => {
            let m = model.as_ref().ok_or("the BPE is not trained yet (a bug)")?;
            super::bpe::encode(m, text()?).map_err(|e| format!("{e:#}"))?
        }
        Tokenizer::Hf { model, .. } => model.encode_document(text()?).map_err(|e| format!("{e:#}"))?,
    })
}

/// The shards of one split, rolled over every `max` tokens.
struct Shards {
    dir: PathBuf,
    prefix: String,
    index: usize,
    width: Width,
    max: usize,
    open: Option<ShardWriter>,
    done: Vec<ShardWriter>,
    tokens: usize,
}

impl Shards {
    fn new(dir: &Path, name: &str, split: &str, first: usize, width: Width, max: usize) -> Shards {
        Shards {
            dir: dir.to_path_buf(),
            prefix: format!("{name}_{split}_"),
            index: first,
            width,
            max,
            open: None,
            done: Vec::new(),
            tokens: 0,
        }
    }

    fn push(&mut self, mut tokens: &[u32]) -> Result<()> {
        while !tokens.is_empty() {
            if self.open.as_ref().is_some_and(|w| w.len() >= self.max) {
                self.done.push(self.open.take().unwrap());
            }
            if self.open.is_none() {
                let path = self.dir.join(format!("{}{:06}.bin", self.prefix, self.index));
                self.index += 1;
                self.open = Some(ShardWriter::create(&path, self.width)?);
            }
            let w = self.open.as_mut().unwrap();
            let take = (self.max - w.len()).min(tokens.len());
            w.push(&tokens[..take])?;
            self.tokens += take;
            tokens = &tokens[take..];
        }
        Ok(())
    }

    fn writers(mut self) -> Vec<ShardWriter> {
        self.done.extend(self.open.take());
        self.done
    }
}

/// Where the documents go, with the last training document held back (see the module docs).
struct Router {
    rule: SplitRule,
    docs: u64,
    val_docs: u64,
    held: Option<Vec<u32>>,
    val: Shards,
    train: Shards,
}

impl Router {
    fn route(&mut self, tokens: Vec<u32>) -> Result<()> {
        let i = self.docs;
        self.docs += 1;
        if self.rule.is_val(i) {
            self.val_docs += 1;
            return self.val.push(&tokens);
        }
        if let Some(prev) = self.held.replace(tokens) {
            self.train.push(&prev)?;
        }
        Ok(())
    }

    /// The held-back document's place, once the stream has ended. Returns whether the corpus
    /// was one document split inside it.
    fn finish(&mut self, fraction: f64) -> Result<bool> {
        let Some(last) = self.held.take() else { return Ok(false) };
        if self.val_docs > 0 {
            self.train.push(&last)?;
            return Ok(false);
        }
        if self.docs > 1 {
            self.val_docs += 1;
            self.val.push(&last)?;
            return Ok(false);
        }
        // One document: its tail is the validation set.
        if last.len() < 2 {
            bail!("the input yields only {} token; need at least 2 to split into validation and training", last.len());
        }
        let n_val = ((last.len() as f64 * fraction).ceil() as usize).clamp(1, last.len() - 1);
        let (train, val) = last.split_at(last.len() - n_val);
        self.train.push(train)?;
        self.val.push(val)?;
        Ok(true)
    }
}

/// Reads a chunk of items: enough text to keep every core busy, bounded in size.
fn next_chunk(docs: &mut Documents) -> Result<Vec<Item>> {
    const CHUNK_BYTES: usize = 32 << 20;
    const MAX_BYTES: usize = 512 << 20;
    let want_docs = 2 * rayon::current_num_threads();
    let (mut items, mut bytes) = (Vec::new(), 0usize);
    for item in docs.by_ref() {
        let item = item?;
        if let Item::Doc { bytes: b, .. } = &item {
            bytes += b.len();
        }
        items.push(item);
        if (bytes >= CHUNK_BYTES && items.len() >= want_docs) || bytes >= MAX_BYTES || items.len() >= 16_384 {
            break;
        }
    }
    Ok(items)
}

/// Counts and names skipped documents, or stops at the first.
struct Bad {
    skip: bool,
    count: u64,
    examples: Vec<String>,
}

impl Bad {
    fn note(&mut self, at: &Location, why: &str) -> Result<()> {
        if !self.skip {
            bail!("{at}: {why} (pass --skip-bad to count and skip such documents)");
        }
        self.count += 1;
        if self.examples.len() < 5 {
            self.examples.push(format!("{at}: {why}"));
        }
        Ok(())
    }
}

/// The text a `bpe:N` tokenizer is learnt from: training documents only (by the split rule),
/// at most `SAMPLE` bytes of them; a corpus of one document gives its leading `1 − f`.
fn bpe_sample(files: &[PathBuf], rule: SplitRule, spec: &InputSpec, skip_bad: bool) -> Result<Vec<String>> {
    const SAMPLE: usize = 256 << 20;
    let mut docs = Documents::new(files.to_vec(), spec.clone());
    let mut bad = Bad { skip: skip_bad, count: 0, examples: Vec::new() };
    let (mut texts, mut bytes, mut i, mut any_val) = (Vec::<String>::new(), 0usize, 0u64, false);
    for item in docs.by_ref() {
        match item? {
            Item::Bad { at, why } => bad.note(&at, &why)?,
            Item::Doc { bytes: b, at } => {
                if b.is_empty() {
                    continue;
                }
                let text = String::from_utf8(b).map_err(|e| {
                    anyhow::anyhow!(
                        "{at}: not valid UTF-8 (first bad byte at offset {}); a bpe tokenizer needs UTF-8 text",
                        e.utf8_error().valid_up_to()
                    )
                });
                let text = match text {
                    Ok(t) => t,
                    Err(e) if skip_bad => {
                        bad.note(&at, &format!("{e:#}"))?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let val = rule.is_val(i);
                i += 1;
                any_val |= val;
                if !val {
                    bytes += text.len();
                    texts.push(text);
                    if bytes >= SAMPLE {
                        break;
                    }
                }
            }
        }
    }
    if i == 1 && texts.len() == 1 {
        let t = &texts[0];
        let mut end = ((1.0 - rule.fraction) * t.len() as f64) as usize;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        return Ok(vec![t[..end].to_string()]);
    }
    if !any_val && i > 1 && bytes < SAMPLE {
        texts.pop(); // the last document will be the validation set
    }
    Ok(texts)
}

/// Reads, tokenizes and splits the inputs into shards in `out_dir`; see the module docs.
pub fn prepare(args: &PrepareArgs) -> Result<PrepareReport> {
    if !(args.val_fraction > 0.0 && args.val_fraction < 1.0) {
        bail!("val_fraction must be strictly between 0 and 1, got {}", args.val_fraction);
    }
    if args.val_docs == Some(0) {
        bail!("--val-docs must be at least 1 (a run needs a validation set)");
    }
    if args.name.is_empty() || args.name.contains(['/', '\\']) {
        bail!("shard name prefix {:?} must be non-empty and contain no path separator", args.name);
    }
    if args.shard_tokens == 0 || args.shard_tokens > i32::MAX as usize {
        bail!("--shard-tokens must be 1..={} (a shard header counts in i32), got {}", i32::MAX, args.shard_tokens);
    }
    let mut tok = Tokenizer::from_name(&args.tokenizer)?;
    let files = collect_files(&args.inputs)?;
    if files.is_empty() {
        let shown: Vec<String> = args.inputs.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "no input files found (inputs: [{}]; directories contribute their *.txt, *.jsonl[.gz|.zst] and *.parquet files)",
            shown.join(", ")
        );
    }
    let rule = SplitRule { fraction: args.val_fraction, val_docs: args.val_docs };
    if let Tokenizer::Bpe { vocab, model } = &mut tok {
        let texts = bpe_sample(&files, rule, &args.spec, args.skip_bad)?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        *model = Some(Box::new(super::bpe::train(&refs, *vocab)?));
    }

    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("creating output directory {}", args.out_dir.display()))?;
    let replaced = super::record::make_room(&args.out_dir, &args.name, &args.tokenizer, args.overwrite)?;
    let width = Width::for_vocab(tok.vocab_size());
    let mut router = Router {
        rule,
        docs: 0,
        val_docs: 0,
        held: None,
        val: Shards::new(&args.out_dir, &args.name, "val", 0, width, args.shard_tokens),
        train: Shards::new(&args.out_dir, &args.name, "train", 1, width, args.shard_tokens),
    };
    let mut bad = Bad { skip: args.skip_bad, count: 0, examples: Vec::new() };
    let mut docs = Documents::new(files.clone(), args.spec.clone());
    let bar = progress_bar(args.progress, docs.total_bytes());
    loop {
        let items = next_chunk(&mut docs)?;
        if items.is_empty() {
            break;
        }
        let tokens: Vec<Option<std::result::Result<Vec<u32>, String>>> = items
            .par_iter()
            .map(|it| match it {
                Item::Doc { bytes, .. } if !bytes.is_empty() => Some(tokenize_document(&tok, bytes)),
                _ => None,
            })
            .collect();
        for (item, t) in items.into_iter().zip(tokens) {
            match (item, t) {
                (Item::Bad { at, why }, _) => bad.note(&at, &why)?,
                (Item::Doc { at, .. }, Some(Err(why))) => bad.note(&at, &why)?,
                (Item::Doc { .. }, Some(Ok(t))) => router.route(t)?,
                (Item::Doc { .. }, None) => {} // an empty document: no document, no delimiter
            }
        }
        if let Some(b) = &bar {
            b.set_position(docs.seen.load(std::sync::atomic::Ordering::Relaxed));
            b.set_message(format!("{} documents, {} tokens", router.docs, router.train.tokens + router.val.tokens));
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if router.docs == 0 {
        bail!(
            "the {} input files hold no document: nothing to tokenize (all empty{})",
            files.len(),
            if bad.count > 0 { " or bad" } else { "" }
        );
    }
    let split_inside_document = router.finish(args.val_fraction)?;
    if router.train.tokens == 0 {
        bail!("every one of the {} documents went to validation: lower --val-docs or --val-fraction", router.docs);
    }
    let (val_tokens, train_tokens, documents, val_documents) = (router.val.tokens, router.train.tokens, router.docs, router.val_docs);
    let writers: Vec<ShardWriter> = router.val.writers().into_iter().chain(router.train.writers()).collect();
    let paths: Vec<PathBuf> = writers.iter().map(|w| w.path().to_path_buf()).collect();
    // Shards of this name from an earlier preparation that this one does not rewrite.
    for old in super::record::shard_files(&args.out_dir) {
        let name = old.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let ours = name.starts_with(&format!("{}_val_", args.name)) || name.starts_with(&format!("{}_train_", args.name));
        if ours && !paths.contains(&old) {
            std::fs::remove_file(&old).with_context(|| format!("removing the stale shard {}", old.display()))?;
        }
    }
    for w in writers {
        w.finish()?;
    }
    if let Tokenizer::Bpe { model: Some(m), .. } = &tok {
        super::bpe::save(m, &args.out_dir)?;
    }
    let record = super::record::CorpusRecord {
        tokenizer: tok.name(),
        vocab: tok.vocab_size(),
        name: args.name.clone(),
        train_tokens,
        val_tokens,
        documents: Some(documents),
        tokenizer_digest: tok.digest().map(str::to_string),
    };
    record.write(&args.out_dir)?;
    Ok(PrepareReport {
        files: files.len(),
        documents,
        val_documents,
        skipped: bad.count,
        skipped_examples: bad.examples,
        train_tokens,
        val_tokens,
        input_bytes: docs.seen.load(std::sync::atomic::Ordering::Relaxed),
        split_inside_document,
        paths,
        replaced,
    })
}

fn progress_bar(on: bool, total: u64) -> Option<indicatif::ProgressBar> {
    if !on {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::SplitRule;

    #[test]
    fn the_fraction_rule_spreads_validation_documents_evenly() {
        let r = SplitRule { fraction: 0.25, val_docs: None };
        let val: Vec<u64> = (0..12).filter(|&i| r.is_val(i)).collect();
        assert_eq!(val, vec![3, 7, 11]);
        let r = SplitRule { fraction: 0.1, val_docs: None };
        assert_eq!((0..1000).filter(|&i| r.is_val(i)).count(), 100);
        let r = SplitRule { fraction: 0.5, val_docs: Some(2) };
        assert_eq!((0..5).filter(|&i| r.is_val(i)).collect::<Vec<_>>(), vec![0, 1]);
    }
}
