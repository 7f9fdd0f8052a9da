//! Hostile input, round two: every file a user names is read through one bounded helper
//! (FIFOs, devices and oversized files refused at once), the value checks of the keys the block
//! kinds brought, named checkpoint tensors against the config's layout, the sampler's KV cache
//! sized to what it draws, and `export` into a folder that holds another model.

mod common;

use common::{grown_checkpoint_with, synthetic_dataset, TestConfig};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use taproot::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_taproot");

fn run(args: &[&str]) -> (bool, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn mkfifo(path: &Path) -> bool {
    let _ = std::fs::remove_file(path);
    Command::new("mkfifo").arg(path).status().map(|s| s.success()).unwrap_or(false)
}

/// A config path of `/dev/zero` read until memory ran out, and a FIFO blocked forever: both are
/// refused at once, naming the file.
#[test]
fn a_config_that_is_a_device_or_a_fifo_is_refused_at_once() {
    let t0 = Instant::now();
    let (ok, out) = run(&["train", "--config", "/dev/zero"]);
    assert!(!ok && out.contains("config /dev/zero: not a regular file"), "{out}");
    let dir = synthetic_dataset("hard-fifo-config");
    let fifo = dir.join("config.toml");
    if mkfifo(&fifo) {
        let (ok, out) = run(&["train", "--config", fifo.to_str().unwrap()]);
        assert!(!ok && out.contains("not a regular file"), "{out}");
    } else {
        println!("SKIP (FIFO part): mkfifo is not available");
    }
    assert!(t0.elapsed() < Duration::from_secs(20), "took {:?}", t0.elapsed());
}

/// `import` read `config.json` and `model.safetensors` without checks: a FIFO hung it forever,
/// `/dev/zero` read until out of memory.
#[test]
fn import_refuses_a_folder_whose_files_are_fifos_or_devices() {
    let dir = synthetic_dataset("hard-import");
    let cfg = TestConfig::new(&dir).name("imp").steps(10).depth(1).write();
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    let t0 = Instant::now();
    if mkfifo(&hf.join("config.json")) {
        let (ok, out) = run(&["import", hf.to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
        assert!(!ok && out.contains("config.json: not a regular file"), "{out}");
    } else {
        println!("SKIP (FIFO part): mkfifo is not available");
    }
    // A real config, and weights that are a device.
    let (ck_dir, ck, _) = grown_checkpoint_with("hard-import-src", |t| t);
    let good = ck_dir.join("hf");
    taproot::export::export(&ck, &good).unwrap();
    let _ = std::fs::remove_file(hf.join("config.json"));
    std::fs::copy(good.join("config.json"), hf.join("config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", hf.join("model.safetensors")).unwrap();
    let out = format!("{:#}", taproot::export::read_tensors(&hf).unwrap_err());
    assert!(out.contains("model.safetensors: not a regular file"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?}", t0.elapsed());
}

/// A shard that is a FIFO is refused, naming it, instead of blocking the run's start.
#[test]
fn a_shard_that_is_a_fifo_is_refused() {
    let dir = synthetic_dataset("hard-shard");
    let shard = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "bin")).unwrap();
    if !mkfifo(&shard) {
        println!("SKIP: mkfifo is not available");
        return;
    }
    let cfg = TestConfig::new(&dir).name("fifo").steps(10).depth(1).write();
    let (ok, out) = run(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && out.contains("not a regular file") && out.contains(shard.file_name().unwrap().to_str().unwrap()), "{out}");
}

fn config_error(base: &str, sets: &[&str]) -> String {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    format!("{:#}", Config::parse(base, &sets).unwrap_err())
}

const LLAMA: &str = "[run]\nname = \"v\"\nsteps = 10\n[data]\ndir = \"d\"\ntokenizer = \"bytes\"\nbatch_size = 2\nseq_len = 8\n\
    [model]\narch = \"llama\"\nchannels = 16\nheads = 2\ndepth = 2\n";
const MOE: &str = "[model.moe]\nexperts = 4\ntop_k = 2\n";

/// Keys added with the block kinds that were accepted at any value: each refused naming the
/// key, with its range.
#[test]
fn the_block_kinds_keys_are_range_checked() {
    let moe = format!("{LLAMA}{MOE}");
    Config::parse(&moe, &[]).unwrap();
    let cases: [(&str, &[&str], &str); 9] = [
        (LLAMA, &["model.norm_eps=1e30"], "`model.norm_eps` must be a number in (0, 1]"),
        (LLAMA, &["model.rope_theta=1e30"], "`model.rope_theta` must be a number in (1, 1e12]"),
        (LLAMA, &["model.max_seq=1099511627776"], "`model.max_seq` (1099511627776) must be at most"),
        (LLAMA, &["model.kv_heads=3"], "`model.kv_heads` (3)"),
        (&moe, &["model.moe.aux_loss=1e30"], "`model.moe.aux_loss` must be a number in [0, 1]"),
        (&moe, &["model.moe.bias_update_rate=5.0"], "`model.moe.bias_update_rate`"),
        (&moe, &["model.moe.first_dense_layers=2"], "`model.moe.first_dense_layers` (2) makes every one of the model's 2 layers"),
        (&moe, &["model.moe.experts=1000000"], "`model.moe.experts` must be at most 4096"),
        (&moe, &["model.moe.top_k=5"], "`model.moe.top_k` (5)"),
    ];
    for (base, sets, want) in cases {
        let e = config_error(base, sets);
        assert!(e.contains(want), "{sets:?}: {e}");
    }
    // The product of the parallel sizes cannot overflow into one process.
    let e = config_error(LLAMA, &["parallel.data=4294967296", "parallel.pipeline=4294967296", "data.micro_batches=4294967296"]);
    assert!(e.contains("parallel.data") && e.contains("parallel.pipeline"), "{e}");
}

/// A LLaMA model with a context of 2^22 positions samples with a KV cache the size of what it
/// draws (it was sized for the whole context: "needs 256 GiB", or an abort).
#[test]
fn a_long_context_model_samples_with_a_cache_of_what_it_draws() {
    let (dir, ck, _) = grown_checkpoint_with("hard-long-context", |t| t.set("model.arch", "\"llama\"").set("model.max_seq", 1 << 22));
    let hf = dir.join("hf");
    taproot::export::export(&ck, &hf).unwrap();
    for path in [dir.join("grown").join("checkpoints"), hf] {
        let (ok, out) = run(&["sample", path.to_str().unwrap(), "--prompt", "the", "--tokens", "16"]);
        assert!(ok && out.starts_with("the"), "{}: {out}", path.display());
    }
}

/// `export` into a folder that holds another model's files (its shard index would be read
/// beside the new weights) is refused; `--overwrite` moves them aside; a re-export over its
/// own files is fine.
#[test]
fn export_refuses_a_folder_with_files_it_did_not_write() {
    let (dir, _, _) = grown_checkpoint_with("hard-export", |t| t);
    let ck = dir.join("grown").join("checkpoints");
    let out = dir.join("hf");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("model.safetensors.index.json"), "{\"weight_map\": {}}").unwrap();
    let o = out.to_str().unwrap();
    let (ok, text) = run(&["export", ck.to_str().unwrap(), "--out", o]);
    assert!(!ok && text.contains("`model.safetensors.index.json`") && text.contains("--overwrite"), "{text}");
    assert!(!out.join("model.safetensors").exists(), "wrote beside the foreign files");
    let (ok, text) = run(&["export", ck.to_str().unwrap(), "--out", o, "--overwrite"]);
    assert!(ok, "{text}");
    assert!(out.join("model.safetensors").exists() && !out.join("model.safetensors.index.json").exists());
    let moved: Vec<_> =
        std::fs::read_dir(&out).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("replaced-")).collect();
    assert_eq!(moved.len(), 1);
    assert!(moved[0].path().join("model.safetensors.index.json").exists(), "the foreign file was not kept");
    // The folder now holds a taproot export (and the replaced-… folder, which is foreign).
    std::fs::remove_dir_all(moved[0].path()).unwrap();
    let (ok, text) = run(&["export", ck.to_str().unwrap(), "--out", o]);
    assert!(ok, "re-export over its own files: {text}");
}
