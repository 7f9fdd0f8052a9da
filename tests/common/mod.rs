//! Shared helpers of the integration tests: a small synthetic byte corpus and a tiny config.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use taproot::backend::cpu::CpuBackend;
use taproot::backend::Backend;
use taproot::config::Config;
use taproot::data::write_shard;
use taproot::rng::Rng;

/// A byte corpus with learnable structure, as shards in a fresh temp dir unique to `tag`.
pub fn synthetic_dataset(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("taproot-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let words = ["the ", "cat ", "sat ", "on ", "a ", "mat ", "and ", "dog ", "ran ", "far "];
    let mut x: u64 = 7;
    let mut text = String::new();
    while text.len() < 60_000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        text.push_str(words[(x >> 33) as usize % words.len()]);
        if (x >> 20) % 7 == 0 {
            text.push_str(".\n");
        }
    }
    let toks: Vec<u32> = text.bytes().map(u32::from).collect();
    let split = toks.len() * 9 / 10;
    write_shard(&dir.join("syn_train_000001.bin"), &toks[..split]).unwrap();
    write_shard(&dir.join("syn_val_000000.bin"), &toks[split..]).unwrap();
    dir
}

/// A tiny progressive config (0 -> `target_depth` 4 unless `extra` says otherwise) writing its
/// run outputs under `dir/<name>`.
pub fn tiny_config(dir: &Path, name: &str, steps: u64, extra: &str) -> Config {
    let text = format!(
        r#"
[run]
name = "{name}"
steps = {steps}
log_every = 0
out_dir = "{out}"
[data]
dir = "{data}"
tokenizer = "bytes"
batch_size = 4
seq_len = 16
micro_batches = {mbs}
[model]
channels = 32
heads = 2
depth = {depth}
target_depth = 4
[schedule]
lr = 0.02
[eval]
every = 10
batches = 3
{extra}
"#,
        out = dir.join(name).display(),
        data = dir.display(),
        mbs = if name.starts_with("p4") { 4 } else { 2 },
        depth = if extra.contains("copying") { 1 } else { 0 },
    );
    Config::parse(&text, &[]).unwrap_or_else(|e| panic!("{e:#}"))
}

type B = CpuBackend;

/// A CPU buffer holding `host`.
pub fn buf(be: &B, host: &[f32]) -> <B as Backend>::Buf {
    let b = be.alloc(host.len());
    be.upload(B::whole(&b), host);
    b
}

/// A CPU buffer's contents.
pub fn host(be: &B, b: &<B as Backend>::Buf) -> Vec<f32> {
    let mut v = vec![0.0; B::buf_len(b)];
    be.download(B::whole(b), &mut v);
    v
}

/// `n` draws from N(0, std²).
pub fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v, std);
    v
}
