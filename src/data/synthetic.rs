//! A small byte corpus with learnable structure — random words of a ten-word vocabulary, in
//! sentences — made in code, for the tests and the examples (a model learns it within tens of
//! steps; no download needed).

use super::record::CorpusRecord;
use super::shard::write_shard;
use anyhow::{Context, Result};
use std::path::Path;

/// Write the corpus as llm.c-format shards `syn_train_000001.bin` (90%) and `syn_val_000000.bin`
/// (10%), with their `corpus.json` record, into `dir` (created if missing).
pub fn word_corpus(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let words = ["the ", "cat ", "sat ", "on ", "a ", "mat ", "and ", "dog ", "ran ", "far "];
    let mut x: u64 = 7;
    let mut text = String::new();
    while text.len() < 60_000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        text.push_str(words[(x >> 33) as usize % words.len()]);
        if (x >> 20).is_multiple_of(7) {
            text.push_str(".\n");
        }
    }
    let toks: Vec<u32> = text.bytes().map(u32::from).collect();
    let split = toks.len() * 9 / 10;
    write_shard(&dir.join("syn_train_000001.bin"), &toks[..split])?;
    write_shard(&dir.join("syn_val_000000.bin"), &toks[split..])?;
    let record = CorpusRecord {
        tokenizer: "bytes".into(),
        vocab: 256,
        name: "syn".into(),
        train_tokens: split,
        val_tokens: toks.len() - split,
        documents: None,
        tokenizer_digest: None,
    };
    record.write(dir)
}
