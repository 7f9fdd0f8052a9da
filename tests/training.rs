//! Training end to end with the sequential trainer: a 0-layer model trains, a progressive run
//! grows and keeps training, runs are bitwise reproducible, and the demo config reaches the
//! validation loss the issue asks for.

mod common;

use common::{synthetic_dataset, TestConfig};
use std::path::Path;
use std::time::Instant;
use taproot::backend::cpu::CpuBackend;
use taproot::config::Config;
use taproot::data::{prepare, Dataset, PrepareArgs};
use taproot::train::{sequential::Sequential, RunOptions};

/// The tiny model (0 -> 2 blocks), 80 steps; `run.out_dir` left at its default.
fn tiny(dir: &Path) -> TestConfig {
    TestConfig::new(dir).steps(80).target_depth(2).lr(0.02).eval(20, 4).unset("run.out_dir")
}

fn quiet() -> RunOptions {
    RunOptions { quiet: true, ..Default::default() }
}

#[test]
fn zero_layer_model_trains() {
    let dir = synthetic_dataset("zero");
    let cfg = tiny(&dir).unset("model.target_depth").build();
    let data = Dataset::open(&dir, 256).unwrap();
    let mut tr = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap();
    assert_eq!(tr.model.depth(), 0);
    let rep = tr.run(&quiet()).unwrap();
    let first = rep.evals.first().unwrap().val_loss;
    let last = rep.final_val_loss().unwrap();
    println!("0-layer model: val loss {first:.3} -> {last:.3}");
    assert!((first - (256f32).ln()).abs() < 0.1, "a fresh model predicts ~uniformly: {first}");
    assert!(last < 0.7 * first, "0-layer model did not learn: {first} -> {last}");
    assert!(rep.steps.iter().all(|s| s.depth == 0));
}

#[test]
fn progressive_run_grows_at_tau_and_keeps_training() {
    let dir = synthetic_dataset("grow");
    let cfg = tiny(&dir).grow_at(0.5, 2).build();
    let data = Dataset::open(&dir, 256).unwrap();
    let mut tr = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap();
    let rep = tr.run(&quiet()).unwrap();
    assert_eq!(rep.growth.len(), 1);
    assert_eq!(rep.growth[0].new_ids, vec![0, 1]);
    // steps are 1-based "updates done": the update of step index 40 is the first at depth 2
    assert!(rep.steps.iter().filter(|s| s.step <= 40).all(|s| s.depth == 0));
    assert!(rep.steps.iter().filter(|s| s.step > 40).all(|s| s.depth == 2));
    let at_growth = rep.evals.iter().find(|e| e.step == 40).unwrap().val_loss;
    let last = rep.final_val_loss().unwrap();
    println!("progressive 0->2: val loss at tau {at_growth:.3}, final {last:.3}");
    assert!(last.is_finite() && last < at_growth, "training did not continue after growth: {at_growth} -> {last}");
    // FLOPs: the grown model costs more per step than the 0-layer one
    let before = rep.steps[1].flops_llmc - rep.steps[0].flops_llmc;
    let after = rep.steps[79].flops_llmc - rep.steps[78].flops_llmc;
    assert!(after > before);
}

#[test]
fn sequential_runs_are_bitwise_reproducible() {
    let dir = synthetic_dataset("repro");
    let cfg = tiny(&dir).grow_at(0.25, 2).build();
    let data = Dataset::open(&dir, 256).unwrap();
    let run = || {
        let mut tr = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap();
        let rep = tr.run(&RunOptions { quiet: true, stop_after: Some(40), ..Default::default() }).unwrap();
        rep.steps.iter().map(|s| s.train_loss.to_bits()).collect::<Vec<_>>()
    };
    let (a, b) = (run(), run());
    assert_eq!(a.len(), 40);
    assert_eq!(a, b, "same config and seed gave different losses");
}

/// The demo config (byte-level Shakespeare, 6 blocks, C=128, 4 heads, T=128, B=16) reaches a
/// validation loss below 2.0 nats/byte within its 3000 steps. Stops at the first evaluation below.
#[test]
fn demo_config_reaches_val_loss_below_2_within_3000_steps() {
    demo_reaches_2("demo-fixed.toml", |_| {});
}

/// The LLaMA demo (config/llama-demo.toml: GQA, rotary, SwiGLU, untied head) at its full depth
/// of 6 from the start, as the GPT-2 demo's test trains demo-fixed.toml: below 2.0 nats/byte
/// within its 3000 steps.
#[test]
fn llama_demo_config_at_full_depth_reaches_val_loss_below_2_within_3000_steps() {
    demo_reaches_2("llama-demo.toml", |cfg| {
        cfg.model.depth = 6;
        cfg.growth.clear();
    });
}

/// The MoE demo (config/moe-demo.toml: 8 experts, 2 per token, sigmoid routing with the
/// balancing bias, a dense first layer) at its full depth of 6 from the start: below 2.0
/// nats/byte within its 3000 steps.
#[test]
fn moe_demo_config_at_full_depth_reaches_val_loss_below_2_within_3000_steps() {
    demo_reaches_2("moe-demo.toml", |cfg| {
        cfg.model.depth = 6;
        cfg.growth.clear();
    });
}

fn demo_reaches_2(config: &str, change: impl Fn(&mut Config)) {
    let shards = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare-bytes");
    let raw = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/raw/shakespeare");
    // The demo tests run in parallel: one of them prepares the shards while the others wait
    // (two preparing at once race on the same temporary files).
    static PREPARING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = PREPARING.lock().unwrap_or_else(|p| p.into_inner());
    if !shards.join("shakespeare_val_000000.bin").exists() {
        if raw.exists() {
            prepare(&PrepareArgs {
                inputs: vec![raw],
                out_dir: shards.clone(),
                tokenizer: "bytes".into(),
                val_fraction: 0.1,
                name: "shakespeare".into(),
                overwrite: false,
                ..PrepareArgs::default()
            })
            .unwrap();
        } else if std::env::var("TAPROOT_REQUIRE_DATA").is_ok() {
            panic!("TAPROOT_REQUIRE_DATA is set but the corpus is missing: run scripts/fetch-data.sh");
        } else {
            println!("SKIP: no Shakespeare corpus in data/ (run scripts/fetch-data.sh to enable this test)");
            return;
        }
    }
    drop(guard);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(config);
    let mut cfg = Config::load(&path, &[]).unwrap();
    cfg.data.dir = shards;
    change(&mut cfg);
    let data = Dataset::open(&cfg.data.dir, 256).unwrap();
    let t0 = Instant::now();
    let mut tr = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap();
    let rep = tr.run(&RunOptions { quiet: true, stop_below_val: Some(2.0), ..Default::default() }).unwrap();
    println!("{config} validation curve (step, val_loss):");
    for e in &rep.evals {
        println!("  {:5} {:.4}", e.step, e.val_loss);
    }
    let last = rep.evals.last().unwrap();
    println!("reached val_loss={:.4} at step {} in {:.1} s", last.val_loss, last.step, t0.elapsed().as_secs_f64());
    assert!(last.step <= 3000);
    assert!(last.val_loss < 2.0, "val loss {} after {} steps", last.val_loss, last.step);
}
