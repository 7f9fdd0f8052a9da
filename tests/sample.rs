//! `taproot sample` (src/sample.rs): decoding with a KV cache from a grown run's checkpoint.
//!
//! - At every position the cached decoder's logits equal the CPU backend's full forward of the
//!   same sequence (1e-5 relative): the cache, the stack order and the tied head are right.
//! - The draw: temperature 0, top-k 1 and a tiny top-p are all greedy; at temperature 1 the draw
//!   frequencies follow the softmax (±0.015 over 20,000 draws); top-k and top-p cut the tail;
//!   a seed reproduces a sample.
//! - Bad options and a full context are handled; the CLI prints text.

mod common;

use common::{grown_checkpoint, grown_checkpoint_with, model_of, TestConfig};
use taproot::backend::cpu::CpuBackend;
use taproot::data::Dataset;
use taproot::model::Batch;
use taproot::rng::Rng;
use taproot::sample::{draw, generate, HostModel, SampleOptions};

fn opts(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SampleOptions {
    SampleOptions { tokens: 20, temperature, top_k, top_p, seed }
}

#[test]
fn the_kv_cache_decoder_gives_the_full_forward_logits_at_every_position() {
    check_decoder(grown_checkpoint("sample-logits"));
}

#[test]
fn the_decoder_applies_the_depth_mup_branch_multiplier() {
    check_decoder(grown_checkpoint_with("sample-mup", |t| t.set("model.parameterization", "depth_mup")));
}

#[test]
fn the_decoder_runs_llama_blocks_with_an_untied_head() {
    // Rotary positions, grouped-query attention (4 heads sharing 2), SwiGLU, RMSNorm, lm_head.
    check_decoder(grown_checkpoint_with("sample-llama", |t| t.set("model.arch", "\"llama\"").heads(4).set("model.kv_heads", 2)));
}

#[test]
fn the_decoder_runs_qwen3_blocks_with_qk_norm_and_a_branch_multiplier() {
    check_decoder(grown_checkpoint_with("sample-qwen3", |t| {
        t.set("model.arch", "\"qwen3\"").heads(4).set("model.kv_heads", 1).set("model.parameterization", "\"depth_mup\"")
    }));
}

#[test]
fn the_decoder_runs_mixture_of_experts_blocks() {
    check_decoder(grown_checkpoint_with("sample-moe", |t| {
        t.set("model.arch", "\"llama\"").heads(4).extra(
            "[model.moe]\nexperts = 4\ntop_k = 2\nshared_experts = 1\nexpert_hidden = 32\nrouting = \"sigmoid\"\nfirst_dense_layers = 1\n",
        )
    }));
}

fn check_decoder((dir, ck, _): (std::path::PathBuf, taproot::checkpoint::Checkpoint, taproot::config::Config)) {
    let host = HostModel::from_checkpoint(&ck).unwrap();
    let be = CpuBackend::default();
    let dims = host.dims.clone();
    let mut model = model_of(&be, &ck, &dims);
    let t = 32;
    let data = Dataset::open(&dir, 256).unwrap();
    let window: Vec<u32> = data.val.window(0, t + 1).unwrap();
    let full = model.logits(&be, &Batch::from_windows(&be, &window, 1, t));
    let mut cache = host.cache().unwrap();
    let mut worst = 0.0f64;
    for (pos, &tok) in window[..t].iter().enumerate() {
        let got = host.step(&mut cache, tok).unwrap();
        let want = &full[pos * dims.padded_vocab..pos * dims.padded_vocab + dims.vocab];
        let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        worst = worst.max((num / den).sqrt());
    }
    println!("cached decoder against the full forward: worst relative {worst:.2e} over {t} positions");
    assert!(worst < 1e-5, "{worst:.3e}");
    assert_eq!(cache.len, t);
}

#[test]
fn the_draw_follows_temperature_top_k_and_top_p() {
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln(), f32::NEG_INFINITY];
    let mut rng = Rng::new(3);
    for o in [opts(0.0, 0, 1.0, 1), opts(1.0, 1, 1.0, 1), opts(1.0, 0, 1e-6, 1)] {
        for _ in 0..50 {
            assert_eq!(draw(&logits, &o, &mut rng), 0, "{o:?} is greedy");
        }
    }
    let count = |o: &SampleOptions| {
        let mut rng = Rng::new(o.seed);
        let mut n = [0usize; 4];
        for _ in 0..20_000 {
            n[draw(&logits, o, &mut rng) as usize] += 1;
        }
        n.map(|x| x as f64 / 20_000.0)
    };
    let f = count(&opts(1.0, 0, 1.0, 5));
    println!("frequencies at temperature 1: {f:?}");
    for (got, want) in f.iter().zip([0.5, 0.3, 0.2, 0.0]) {
        assert!((got - want).abs() < 0.015, "{f:?}");
    }
    let k2 = count(&opts(1.0, 2, 1.0, 6));
    assert_eq!(k2[2], 0.0);
    assert!((k2[0] - 0.625).abs() < 0.015, "top-k 2 renormalises: {k2:?}");
    let p6 = count(&opts(1.0, 0, 0.6, 7));
    assert_eq!(p6[2], 0.0, "top-p 0.6 keeps the two tokens that reach it: {p6:?}");
    // Temperature sharpens: at 0.5 the first token is drawn more often than its 0.5.
    assert!(count(&opts(0.5, 0, 1.0, 8))[0] > 0.6);
}

#[test]
fn samples_are_reproducible_and_errors_are_clear() {
    let (_, ck, _) = grown_checkpoint("sample-gen");
    let host = HostModel::from_checkpoint(&ck).unwrap();
    let prompt: Vec<u32> = b"the ".iter().map(|&b| b as u32).collect();
    let a = generate(&host, &prompt, &opts(1.0, 0, 1.0, 11)).unwrap();
    let b = generate(&host, &prompt, &opts(1.0, 0, 1.0, 11)).unwrap();
    let c = generate(&host, &prompt, &opts(1.0, 0, 1.0, 12)).unwrap();
    assert_eq!(a, b, "a seed reproduces its sample");
    assert_ne!(a, c, "another seed draws another sample");
    assert_eq!(&a[..4], &prompt[..], "the sample starts with the prompt");
    assert_eq!(a.len(), 4 + 20);
    // The context holds max_seq positions: a longer request stops there.
    let long = generate(&host, &prompt, &SampleOptions { tokens: 1000, ..opts(1.0, 0, 1.0, 1) }).unwrap();
    assert_eq!(long.len(), host.dims.max_seq);
    for (o, what) in
        [(opts(-1.0, 0, 1.0, 1), "--temperature"), (opts(1.0, 0, 0.0, 1), "--top-p"), (opts(f32::NAN, 0, 1.0, 1), "--temperature")]
    {
        let e = generate(&host, &prompt, &o).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
    assert!(generate(&host, &[], &opts(1.0, 0, 1.0, 1)).unwrap_err().to_string().contains("prompt"));
    assert!(generate(&host, &[9999], &opts(1.0, 0, 1.0, 1)).unwrap_err().to_string().contains("vocabulary"));
}

#[test]
fn sample_from_the_command_line() {
    let (_, _, cfg) = grown_checkpoint("sample-cli");
    let bin = env!("CARGO_BIN_EXE_taproot");
    let o = std::process::Command::new(bin)
        .args(["sample"])
        .arg(cfg.checkpoint_dir())
        .args(["--prompt", "the cat", "--tokens", "30", "--seed", "4"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.starts_with("the cat") && text.trim_end().len() > "the cat".len(), "{text:?}");
    let o = std::process::Command::new(bin).args(["sample", "no/such/dir"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no/such/dir"));
}

/// `taproot sample` on an exported Hugging Face folder draws the same text as on the checkpoint
/// it came from, for each class (GPT-2, LLaMA, Qwen3-MoE), under the same seed.
#[test]
fn sample_from_an_exported_folder_is_the_checkpoints_sample() {
    let bin = env!("CARGO_BIN_EXE_taproot");
    type Change = fn(TestConfig) -> TestConfig;
    let kinds: [(&str, Change); 3] = [
        ("gpt2", |t| t),
        ("llama", |t| t.set("model.arch", "\"llama\"").heads(4).set("model.kv_heads", 2)),
        ("qwen3-moe", |t| t.set("model.arch", "\"qwen3\"").heads(4).extra("[model.moe]\nexperts = 4\ntop_k = 2\nexpert_hidden = 16\n")),
    ];
    for (kind, change) in kinds {
        let (dir, ck, cfg) = grown_checkpoint_with(&format!("sample-hf-{kind}"), change);
        let hf = dir.join("hf");
        taproot::export::export(&ck, &hf).unwrap();
        let sample = |path: &std::path::Path| {
            let o = std::process::Command::new(bin)
                .arg("sample")
                .arg(path)
                .args(["--prompt", "the", "--tokens", "24", "--seed", "9"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{kind}: {}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let (a, b) = (sample(&cfg.checkpoint_dir()), sample(&hf));
        assert!(a.starts_with("the") && a.len() > 10, "{kind}: {a:?}");
        assert_eq!(a, b, "{kind}: the folder's sample differs from the checkpoint's");
    }
}

/// `eval.sample_tokens`: a sample at every evaluation of a training run, from the model as it
/// is then; the same as `taproot sample` draws from that step's checkpoint, and the same
/// again in a repeated run.
#[test]
fn training_prints_a_sample_at_every_evaluation() {
    let dir = common::synthetic_dataset("sample-eval");
    let cfg = common::TestConfig::new(&dir)
        .name("samples")
        .steps(12)
        .micro_batches(2)
        .depth(1)
        .target_depth(2)
        .grow_at_step(6, 2)
        .eval(6, 2)
        .checkpoint_every(6)
        .set("eval.sample_tokens", 24)
        .set("eval.sample_prompt", "\"ab\"")
        .set("run.seed", 5)
        .write();
    let run = || {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_taproot"))
            .args(["train", "--overwrite", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("sample ")).map(String::from).collect::<Vec<_>>()
    };
    let lines = run();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (l, (step, depth)) in lines.iter().zip([(0, 1), (6, 1), (12, 2)]) {
        assert!(l.starts_with(&format!("sample step={step} depth={depth}: \"ab")), "{l}");
    }
    // The model changes between evaluations, so do the samples (same seed, same prompt).
    assert_ne!(lines[0].split_once(": ").unwrap().1, lines[2].split_once(": ").unwrap().1);
    // What `taproot sample` draws from the step-12 checkpoint with the same options.
    let ck = dir.join("samples").join("checkpoints");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_taproot"))
        .args(["sample", ck.to_str().unwrap(), "--prompt", "ab", "--tokens", "24", "--temperature", "1", "--top-k", "40", "--seed", "5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    assert_eq!(lines[2], format!("sample step=12 depth=2: {text:?}"));
    assert_eq!(run(), lines, "a repeated run draws the same samples");
}
