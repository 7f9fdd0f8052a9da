//! Integration tests for the data layer: shards, tokenizers, loader, prepare, dataset.
//!
//! Fast and offline: every test makes its own files in a fresh folder under the system temp
//! directory and removes it afterwards.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use taproot::data::{
    check_tokens, num_sequential_batches, prepare, read_shard, sequential_batches, write_shard, CorpusRecord, Dataset, Loader, PrepareArgs,
    Tokenizer,
};

/// A fresh, empty temp folder, unique per test and per process; removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("taproot-data-test-{}-{}-{}", std::process::id(), tag, n));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Raw header bytes with the given magic, version and count.
fn header(magic: i32, version: i32, count: i32) -> Vec<u8> {
    let mut words = [0i32; 256];
    words[0] = magic;
    words[1] = version;
    words[2] = count;
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn err_string<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

// ---------------------------------------------------------------- shards

#[test]
fn shard_roundtrip() {
    let tmp = TempDir::new("roundtrip");
    let path = tmp.path().join("x_train_000001.bin");
    let tokens: Vec<u32> = vec![0, 1, 2, 50256, 65535, 7];
    write_shard(&path, &tokens).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 1024 + 2 * tokens.len());
    assert_eq!(&bytes[0..4], &20240520i32.to_le_bytes());
    assert_eq!(&bytes[8..12], &(tokens.len() as i32).to_le_bytes());
    let back = read_shard(&path).unwrap();
    assert_eq!(back, tokens);
    // The temp file was renamed away, not left behind.
    assert!(!tmp.path().join("x_train_000001.bin.tmp").exists());
}

#[test]
fn shard_bad_magic() {
    let tmp = TempDir::new("magic");
    let path = tmp.path().join("bad_magic.bin");
    let mut bytes = header(12345, 1, 1);
    bytes.extend_from_slice(&[1, 0]);
    std::fs::write(&path, bytes).unwrap();
    let msg = err_string(read_shard(&path));
    assert!(msg.contains("bad_magic.bin"), "{msg}");
    assert!(msg.contains("expected 20240520"), "{msg}");
    assert!(msg.contains("found 12345"), "{msg}");
}

#[test]
fn shard_bad_version() {
    let tmp = TempDir::new("version");
    let path = tmp.path().join("v3.bin");
    let mut bytes = header(20240520, 3, 1);
    bytes.extend_from_slice(&[1, 0, 0, 0]);
    std::fs::write(&path, bytes).unwrap();
    let msg = err_string(read_shard(&path));
    assert!(msg.contains("v3.bin") && msg.contains("version 3"), "{msg}");
}

#[test]
fn shard_truncated() {
    let tmp = TempDir::new("trunc");
    let path = tmp.path().join("short_val_000000.bin");
    let mut bytes = header(20240520, 1, 10);
    bytes.extend_from_slice(&[1, 0, 2, 0, 3, 0]); // 3 of the promised 10 tokens
    std::fs::write(&path, bytes).unwrap();
    let msg = err_string(read_shard(&path));
    assert!(msg.contains("short_val_000000.bin"), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
    assert!(msg.contains("10 tokens") && msg.contains("room for 3 tokens"), "{msg}");
    assert!(msg.contains("byte offset"), "{msg}");
    assert!(msg.contains("1044 bytes") && msg.contains("1030 bytes"), "{msg}");
}

#[test]
fn shard_trailing_bytes() {
    let tmp = TempDir::new("trailing");
    let path = tmp.path().join("long.bin");
    let mut bytes = header(20240520, 1, 1);
    bytes.extend_from_slice(&[1, 0, 2, 0]);
    std::fs::write(&path, bytes).unwrap();
    let msg = err_string(read_shard(&path));
    assert!(msg.contains("long.bin") && msg.contains("trailing bytes"), "{msg}");
}

#[test]
fn shard_shorter_than_header() {
    let tmp = TempDir::new("tiny");
    let path = tmp.path().join("tiny.bin");
    std::fs::write(&path, [0u8; 100]).unwrap();
    let msg = err_string(read_shard(&path));
    assert!(msg.contains("tiny.bin"), "{msg}");
    assert!(msg.contains("100 bytes") && msg.contains("shorter than the 1024-byte"), "{msg}");
}

#[test]
fn shard_empty_count() {
    let tmp = TempDir::new("empty");
    let path = tmp.path().join("empty.bin");
    std::fs::write(&path, header(20240520, 1, 0)).unwrap();
    let msg = err_string(read_shard(&path));
    assert!(msg.contains("empty.bin") && msg.contains("empty shard"), "{msg}");
}

#[test]
fn check_tokens_names_index_and_offset() {
    let path = Path::new("some_shard.bin");
    assert!(check_tokens(&[0, 255, 10], 256, path).is_ok());
    let msg = err_string(check_tokens(&[0, 255, 256, 300], 256, path));
    assert!(msg.contains("some_shard.bin"), "{msg}");
    assert!(msg.contains("index 2"), "{msg}");
    assert!(msg.contains("byte offset 1028"), "{msg}"); // 1024 + 2*2
    assert!(msg.contains("token id 256"), "{msg}");
}

#[test]
fn write_shard_rejects_wide_tokens() {
    let tmp = TempDir::new("wide");
    let path = tmp.path().join("wide.bin");
    let msg = err_string(write_shard(&path, &[1, 2, 65536, 3]));
    assert!(msg.contains("index 2") && msg.contains("65536"), "{msg}");
    assert!(!path.exists(), "nothing may be written on error");
}

// ---------------------------------------------------------------- tokenizers

#[test]
fn bytes_tokenizer_roundtrip() {
    let tok = Tokenizer::from_name("bytes").unwrap();
    assert_eq!(tok.vocab_size(), 256);
    assert_eq!(tok.eot(), None);
    assert_eq!(tok.name(), "bytes");
    let text = "Hi, é!";
    let ids = tok.encode(text);
    assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(tok.decode(&ids), text);
    // A lone continuation byte is not valid UTF-8: decoded lossily, not a panic.
    assert_eq!(tok.decode(&[0x41, 0xA9]), "A\u{FFFD}");
}

#[test]
fn gpt2_tokenizer() {
    let tok = Tokenizer::from_name("gpt2").unwrap();
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.eot(), Some(50256));
    assert_eq!(tok.encode("Hello world"), vec![15496, 995]);
    let text = "To be, or not to be: that is the question.\n";
    assert_eq!(tok.decode(&tok.encode(text)), text);
    assert_eq!(tok.decode(&[50256]), "<|endoftext|>");
}

#[test]
fn unknown_tokenizer_lists_names() {
    let msg = err_string(Tokenizer::from_name("gpt5"));
    assert!(msg.contains("gpt5") && msg.contains("bytes") && msg.contains("gpt2"), "{msg}");
}

// ---------------------------------------------------------------- loader

fn ramp(n: usize) -> Vec<u16> {
    (0..n).map(|i| (i % 60000) as u16).collect()
}

fn draw(loader: &mut Loader, n: usize) -> Vec<Vec<u32>> {
    let mut batches = Vec::new();
    for _ in 0..n {
        let mut out = Vec::new();
        loader.next_batch(&mut out).unwrap();
        batches.push(out);
    }
    batches
}

#[test]
fn loader_determinism() {
    let tokens = ramp(1000);
    let a = draw(&mut Loader::new(tokens.clone(), 4, 8, 42).unwrap(), 5);
    let b = draw(&mut Loader::new(tokens.clone(), 4, 8, 42).unwrap(), 5);
    let c = draw(&mut Loader::new(tokens, 4, 8, 43).unwrap(), 5);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn loader_windows_are_contiguous_slices() {
    // Distinct values make each window's start position recoverable from its first token.
    let tokens = ramp(500);
    let (b, t) = (3, 16);
    let mut loader = Loader::new(tokens.clone(), b, t, 7).unwrap();
    let mut starts = std::collections::HashSet::new();
    for batch in draw(&mut loader, 50) {
        assert_eq!(batch.len(), b * (t + 1));
        for row in batch.chunks(t + 1) {
            let start = row[0] as usize;
            assert!(start + t < tokens.len(), "window runs past the end");
            let expect: Vec<u32> = tokens[start..start + t + 1].iter().map(|&x| x as u32).collect();
            assert_eq!(row, &expect[..]);
            starts.insert(start);
        }
    }
    assert!(starts.len() > 50, "starts should vary, got {}", starts.len());
    assert_eq!(loader.cursor().batches, 50);
}

#[test]
fn loader_single_window_stream() {
    // Exactly T+1 tokens: the only valid start is 0.
    let tokens = ramp(9);
    let mut loader = Loader::new(tokens, 2, 8, 1).unwrap();
    let mut out = Vec::new();
    loader.next_batch(&mut out).unwrap();
    let row: Vec<u32> = (0..9).collect();
    assert_eq!(out, [row.clone(), row].concat());
}

#[test]
fn loader_cursor_restore() {
    let tokens = ramp(2000);
    let mut run = Loader::new(tokens.clone(), 2, 32, 99).unwrap();
    draw(&mut run, 7);
    let saved = run.cursor();
    let expected = draw(&mut run, 5);

    // Through JSON, as a checkpoint would store it.
    let json = serde_json::to_string(&saved).unwrap();
    let loaded: taproot::data::LoaderState = serde_json::from_str(&json).unwrap();
    assert_eq!(loaded, saved);

    let mut resumed = Loader::new(tokens, 2, 32, 12345).unwrap(); // seed is overridden
    resumed.restore(&loaded);
    assert_eq!(draw(&mut resumed, 5), expected);
    assert_eq!(resumed.cursor(), run.cursor());
}

#[test]
fn loader_too_short_errors() {
    let msg = err_string(Loader::new(ramp(8), 1, 8, 0));
    assert!(msg.contains("8 tokens") && msg.contains("9"), "{msg}");
}

#[test]
fn sequential_batches_cover_in_order() {
    let tokens: taproot::data::Tokens = ramp(100).into();
    let (b, t) = (2, 10);
    // n batches need n*b*t + 1 tokens: 100 tokens -> 4 full batches.
    assert_eq!(num_sequential_batches(tokens.len(), b, t), 4);
    let all: Vec<Vec<u32>> = sequential_batches(&tokens, b, t, usize::MAX).map(Result::unwrap).collect();
    assert_eq!(all.len(), 4);
    for (k, batch) in all.iter().enumerate() {
        assert_eq!(batch.len(), b * (t + 1));
        for (r, row) in batch.chunks(t + 1).enumerate() {
            let start = (k * b + r) * t;
            let expect: Vec<u32> = (start..start + t + 1).map(|x| x as u32).collect();
            assert_eq!(row, &expect[..]);
        }
    }
    // Deterministic, and limited by max_batches.
    let again: Vec<Vec<u32>> = sequential_batches(&tokens, b, t, 2).map(Result::unwrap).collect();
    assert_eq!(again, all[..2].to_vec());
    assert_eq!(sequential_batches(&tokens.window(0, 20).unwrap().into(), b, t, 10).len(), 0);
}

// ---------------------------------------------------------------- prepare and dataset

#[test]
fn prepare_splits_by_document() {
    let tmp = TempDir::new("prepare");
    let a = tmp.path().join("a.txt");
    let b = tmp.path().join("b.txt");
    std::fs::write(&a, "First citizen: Before we proceed any further, hear me speak.\n").unwrap();
    std::fs::write(&b, "All: Speak, speak.\nFirst citizen: You are all resolved rather to die.\n").unwrap();
    let out = tmp.path().join("shards");
    let args = PrepareArgs {
        inputs: vec![a.clone(), b.clone()],
        out_dir: out.clone(),
        tokenizer: "gpt2".to_string(),
        val_fraction: 0.25,
        name: "tiny".to_string(),
        overwrite: false,
        ..PrepareArgs::default()
    };
    let report = prepare(&args).unwrap();
    assert_eq!(report.files, 2);

    // Expected stream: EOT before each document, documents in input order.
    let tok = Tokenizer::from_name("gpt2").unwrap();
    let mut stream = vec![50256u32];
    stream.extend(tok.encode(&std::fs::read_to_string(&a).unwrap()));
    stream.push(50256);
    stream.extend(tok.encode(&std::fs::read_to_string(&b).unwrap()));

    let val = read_shard(&out.join("tiny_val_000000.bin")).unwrap();
    let train = read_shard(&out.join("tiny_train_000001.bin")).unwrap();
    assert_eq!(report.val_tokens, val.len());
    assert_eq!(report.train_tokens, train.len());
    assert_eq!(val.len() + train.len(), stream.len());
    // Two documents, a quarter for validation: fewer than 1/f documents, so the last document
    // (whole, with its delimiter) is the validation set.
    let first = 1 + tok.encode(&std::fs::read_to_string(&a).unwrap()).len();
    assert_eq!(train, stream[..first]);
    assert_eq!(val, stream[first..], "val must be the last whole document");
    assert_eq!((report.documents, report.val_documents), (2, 1));
    assert!(report.to_string().contains("2 files"), "{report}");

    // And the directory reads back as a dataset.
    let ds = Dataset::open(&out, 50257).unwrap();
    assert_eq!(ds.train().to_vec().unwrap(), train);
    assert_eq!(ds.val.to_vec().unwrap(), val);
    // A vocab too small for the gpt2 ids is caught, naming the file.
    let msg = err_string(Dataset::open(&out, 256));
    assert!(msg.contains("tiny_") && msg.contains("out of range"), "{msg}");
}

#[test]
fn prepare_directory_with_bytes_tokenizer() {
    let tmp = TempDir::new("prepdir");
    let input = tmp.path().join("texts");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join("2.txt"), b"world").unwrap();
    std::fs::write(input.join("1.txt"), b"hello ").unwrap();
    std::fs::write(input.join("skip.md"), b"not a text file").unwrap();
    let out = tmp.path().join("out");
    let args = PrepareArgs {
        inputs: vec![input],
        out_dir: out.clone(),
        tokenizer: "bytes".to_string(),
        val_fraction: 0.1,
        name: "b".to_string(),
        overwrite: false,
        ..PrepareArgs::default()
    };
    let report = prepare(&args).unwrap();
    assert_eq!(report.files, 2);
    let train = read_shard(&out.join("b_train_000001.bin")).unwrap();
    let val = read_shard(&out.join("b_val_000000.bin")).unwrap();
    let all: Vec<u8> = train.iter().chain(val.iter()).map(|&x| x as u8).collect();
    assert_eq!(all, b"hello world", "files are read in sorted order, .md skipped");
    assert_eq!(val, b"world".map(u32::from), "the last document is the validation set");
}

#[test]
fn prepare_empty_input_errors() {
    let tmp = TempDir::new("prepempty");
    let out = tmp.path().join("out");
    // No files at all.
    let args = PrepareArgs {
        inputs: vec![tmp.path().to_path_buf()],
        out_dir: out.clone(),
        tokenizer: "bytes".to_string(),
        val_fraction: 0.1,
        name: "e".to_string(),
        overwrite: false,
        ..PrepareArgs::default()
    };
    let msg = err_string(prepare(&args));
    assert!(msg.contains("no input files"), "{msg}");
    // Only empty files.
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let args = PrepareArgs { inputs: vec![empty], ..args };
    let msg = err_string(prepare(&args));
    assert!(msg.contains("empty"), "{msg}");
    assert!(!out.join("e_val_000000.bin").exists());
}

#[test]
fn prepare_rejects_non_utf8_for_gpt2() {
    let tmp = TempDir::new("prepbin");
    let bad = tmp.path().join("latin1.txt");
    std::fs::write(&bad, b"caf\xe9").unwrap();
    let args = PrepareArgs {
        inputs: vec![bad],
        out_dir: tmp.path().join("out"),
        tokenizer: "gpt2".to_string(),
        val_fraction: 0.1,
        name: "x".to_string(),
        overwrite: false,
        ..PrepareArgs::default()
    };
    let msg = err_string(prepare(&args));
    assert!(msg.contains("latin1.txt") && msg.contains("UTF-8"), "{msg}");
}

#[test]
fn prepare_missing_input_errors() {
    let tmp = TempDir::new("prepmissing");
    let args = PrepareArgs { inputs: vec![tmp.path().join("nope.txt")], out_dir: tmp.path().join("out"), ..PrepareArgs::default() };
    let msg = err_string(prepare(&args));
    assert!(msg.contains("nope.txt") && msg.contains("does not exist"), "{msg}");
}

#[test]
fn dataset_without_val_errors() {
    let tmp = TempDir::new("noval");
    write_shard(&tmp.path().join("d_train_000001.bin"), &[1, 2, 3]).unwrap();
    let msg = err_string(Dataset::open(tmp.path(), 256));
    assert!(msg.contains("no validation shard"), "{msg}");
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
}

#[test]
fn dataset_without_train_errors() {
    let tmp = TempDir::new("notrain");
    write_shard(&tmp.path().join("d_val_000000.bin"), &[1, 2, 3]).unwrap();
    let msg = err_string(Dataset::open(tmp.path(), 256));
    assert!(msg.contains("no training shard"), "{msg}");
}

#[test]
fn dataset_concatenates_train_shards_in_name_order() {
    let tmp = TempDir::new("multi");
    write_shard(&tmp.path().join("d_val_000000.bin"), &[9]).unwrap();
    write_shard(&tmp.path().join("d_train_000002.bin"), &[3, 4]).unwrap();
    write_shard(&tmp.path().join("d_train_000001.bin"), &[1, 2]).unwrap();
    std::fs::write(tmp.path().join("README.txt"), b"ignored").unwrap();
    let ds = Dataset::open(tmp.path(), 256).unwrap();
    assert_eq!(ds.train().to_vec().unwrap(), vec![1, 2, 3, 4]);
    assert_eq!(ds.val.to_vec().unwrap(), vec![9]);
    assert_eq!(ds.vocab, 256);
}

// ---------------------------------------------------------------------------------------------
// A shard folder records its tokenizer, and holds one corpus.

fn bytes_corpus(tmp: &TempDir, out: &Path, name: &str, text: &str) -> PrepareArgs {
    let input = tmp.path().join(format!("{name}.txt"));
    std::fs::write(&input, text).unwrap();
    PrepareArgs {
        inputs: vec![input],
        out_dir: out.to_path_buf(),
        tokenizer: "bytes".into(),
        val_fraction: 0.2,
        name: name.into(),
        overwrite: false,
        ..PrepareArgs::default()
    }
}

#[test]
fn a_gpt2_config_on_byte_level_shards_is_an_error() {
    let tmp = TempDir::new("tok-mismatch");
    let out = tmp.path().join("shards");
    prepare(&bytes_corpus(&tmp, &out, "plays", "To be, or not to be, that is the question.\n")).unwrap();
    let gpt2 = Tokenizer::from_name("gpt2").unwrap();
    let msg = err_string(Dataset::open_for(&out, &gpt2));
    assert!(msg.contains("tokenized with `bytes`") && msg.contains("`data.tokenizer` is `gpt2`"), "{msg}");
    let bytes = Tokenizer::from_name("bytes").unwrap();
    assert!(Dataset::open_for(&out, &bytes).is_ok());
    // Shards without a record (llm.c's scripts) are read as before.
    std::fs::remove_file(out.join("corpus.json")).unwrap();
    assert!(Dataset::open_for(&out, &gpt2).is_ok());
}

#[test]
fn prepare_into_a_folder_holding_another_corpus_refuses_unless_overwrite() {
    let tmp = TempDir::new("prep-other");
    let out = tmp.path().join("shards");
    prepare(&bytes_corpus(&tmp, &out, "plays", "Now is the winter of our discontent.\n")).unwrap();
    let before = read_shard(&out.join("plays_train_000001.bin")).unwrap();
    // The same corpus again: rewritten in place (the demo script re-runs prepare).
    prepare(&bytes_corpus(&tmp, &out, "plays", "Now is the winter of our discontent.\n")).unwrap();
    // Another corpus: refused, nothing written or merged.
    let msg = err_string(prepare(&bytes_corpus(&tmp, &out, "poems", "Of Mans First Disobedience, and the Fruit.\n")));
    assert!(msg.contains("already holds") && msg.contains("--overwrite"), "{msg}");
    assert!(!out.join("poems_train_000001.bin").exists());
    assert_eq!(read_shard(&out.join("plays_train_000001.bin")).unwrap(), before);
    // With overwrite: the old corpus is moved aside whole, the new one stands alone.
    let rep =
        prepare(&PrepareArgs { overwrite: true, ..bytes_corpus(&tmp, &out, "poems", "Of Mans First Disobedience, and the Fruit.\n") })
            .unwrap();
    let aside = rep.replaced.expect("moved aside");
    assert_eq!(read_shard(&aside.join("plays_train_000001.bin")).unwrap(), before);
    let ds = Dataset::open(&out, 256).unwrap();
    let text: String = ds.train().to_vec().unwrap().iter().chain(ds.val.to_vec().unwrap().iter()).map(|&t| t as u8 as char).collect();
    assert!(text.starts_with("Of Mans") && !text.contains("winter"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// bpe:N: a byte-level BPE learnt from the corpus.

#[test]
fn prepare_with_a_learnt_bpe_writes_its_vocabulary_and_round_trips() {
    let tmp = TempDir::new("bpe");
    let words = ["the ", "cat ", "sat ", "on ", "a ", "mat ", "and ", "dog ", "ran ", "far "];
    let mut text = String::new();
    let mut x: u64 = 11;
    while text.len() < 40_000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        text.push_str(words[(x >> 33) as usize % words.len()]);
        if (x >> 20).is_multiple_of(9) {
            text.push_str("é.\n");
        }
    }
    let input = tmp.path().join("words.txt");
    std::fs::write(&input, &text).unwrap();
    let out = tmp.path().join("shards");
    let args = PrepareArgs {
        inputs: vec![input],
        out_dir: out.clone(),
        tokenizer: "bpe:300".into(),
        val_fraction: 0.1,
        name: "words".into(),
        overwrite: false,
        ..PrepareArgs::default()
    };
    let rep = prepare(&args).unwrap();
    // The merges shorten the stream well below one token per byte, and use ids past the bytes.
    assert!(rep.train_tokens + rep.val_tokens < text.len() / 2, "{rep}");
    let train = read_shard(&out.join("words_train_000001.bin")).unwrap();
    assert!(train.iter().all(|&t| (t as usize) < 300) && train.iter().any(|&t| t >= 256));
    // The vocabulary is beside the shards, and decodes the stream back to the text.
    let bpe = taproot::data::bpe::load(&out).unwrap();
    let val = read_shard(&out.join("words_val_000000.bin")).unwrap();
    let ids: Vec<u32> = train.iter().chain(val.iter()).copied().collect();
    assert_eq!(taproot::data::bpe::decode(&bpe, &ids).unwrap(), text);
    // The record says bpe:300: a config with that tokenizer reads the shards, another does not.
    let record = CorpusRecord::read(&out).unwrap().unwrap();
    assert_eq!((record.tokenizer.as_str(), record.vocab), ("bpe:300", 300));
    let ds = Dataset::open_for(&out, &Tokenizer::from_name("bpe:300").unwrap()).unwrap();
    assert_eq!(ds.train().len(), train.len());
    assert!(err_string(Dataset::open_for(&out, &Tokenizer::from_name("bytes").unwrap())).contains("tokenized with `bpe:300`"));
    assert!(err_string(Dataset::open_for(&out, &Tokenizer::from_name("bpe:512").unwrap())).contains("tokenized with `bpe:300`"));
}

#[test]
fn bpe_tokenizer_names_are_checked() {
    assert_eq!(Tokenizer::from_name("bpe:4096").unwrap().vocab_size(), 4096);
    assert_eq!(Tokenizer::from_name("bpe:4096").unwrap().name(), "bpe:4096");
    for bad in ["bpe:256", "bpe:70000", "bpe:x", "bpe:"] {
        let e = format!("{:#}", Tokenizer::from_name(bad).unwrap_err());
        assert!(e.contains("bpe:"), "{bad}: {e}");
    }
}
