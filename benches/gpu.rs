//! GPU benchmark (run by `scripts/gpu-check.sh`): GPT-2 124M training (T=1024) on one GPU —
//! tokens/s and MFU against 989 TFLOP/s (H100/H200 dense bf16, the usual yardstick) and
//! against the cuBLAS fp32/TF32 peak measured here — a live 0 → 12 growth on the GPU, and the
//! 12-layer actor pipeline (4 micro-batches) on one GPU and, where there are two, split over
//! two. Prints SKIP and exits 0 where there is no GPU.
//!
//! Protocol: AdamW, random tokens, 2 warmup steps discarded, median of the timed steps (the
//! step ends with a host read of the loss, so the GPU work is included). FLOPs: llm.c's
//! 6N + 6·L·T·C per token.

use std::time::Instant;
use taproot::backend::cuda::{self, CudaBackend};
use taproot::backend::{Backend, Trans};
use taproot::config::Config;
use taproot::data::Dataset;
use taproot::flops;
use taproot::model::init::{InitConfig, InitScheme};
use taproot::model::{Batch, Dims, Model};
use taproot::optim::{OptimConfig, Optimizer, OptimizerKind, Scratch};
use taproot::rng::Rng;
use taproot::runtime::{self, RunOptions};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn gemm_peak(be: &CudaBackend, tf32: bool) -> f64 {
    be.set_tf32(tf32).unwrap();
    let n = 8192;
    let (a, b, c) = (be.alloc(n * n), be.alloc(n * n), be.alloc(n * n));
    be.fill(CudaBackend::whole(&a), 0.01);
    be.fill(CudaBackend::whole(&b), 0.02);
    let mut best = 0.0f64;
    for i in 0..6 {
        be.synchronize();
        let t0 = Instant::now();
        be.gemm(CudaBackend::whole(&c), CudaBackend::whole(&a), Trans::N, CudaBackend::whole(&b), Trans::N, n, n, n, 1.0, 0.0);
        be.synchronize();
        if i > 0 {
            best = best.max(2.0 * (n as f64).powi(3) / t0.elapsed().as_secs_f64() / 1e12);
        }
    }
    be.set_tf32(false).unwrap();
    best
}

/// Median step time of GPT-2 124M at B x 1024 on `be`.
fn train_step_ms(be: &CudaBackend, b: usize, steps: usize) -> (f64, f32) {
    let t = 1024;
    let dims = Dims::new(50257, 1024, 768, 12);
    let mut model = Model::new(be, dims, 12, &InitConfig::new(InitScheme::Gpt2, 12, 1));
    let opt = Optimizer::new(OptimConfig { kind: OptimizerKind::Adamw, ..OptimConfig::default() });
    let mut scratch = Scratch::default();
    let mut rng = Rng::new(5);
    let mut windows = vec![0u32; b * (t + 1)];
    let mut batch = Batch::from_windows(be, &windows, b, t);
    let (mut ti, mut tt) = (Vec::new(), Vec::new());
    let mut times = Vec::new();
    let mut loss = 0.0;
    for i in 0..steps + 2 {
        windows.iter_mut().for_each(|w| *w = rng.below(50257) as u32);
        batch.load(be, &windows, &mut ti, &mut tt);
        let t0 = Instant::now();
        loss = model.forward_backward(be, &batch, 1.0 / (b * t) as f32);
        model.finish_grads(be);
        opt.step(be, &mut model.embed.w, &mut scratch, 3e-4);
        for blk in model.blocks.iter_mut() {
            opt.step(be, &mut blk.w, &mut scratch, 3e-4);
        }
        opt.step(be, &mut model.head.w, &mut scratch, 3e-4);
        model.zero_grad(be);
        be.synchronize();
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    (median(times), loss)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let be = match cuda::device_count() {
        Ok(n) if n > 0 => CudaBackend::open("cuda:0").expect("open cuda:0"),
        Ok(_) => return println!("SKIP: no CUDA device"),
        Err(e) => return println!("SKIP: {e:#}"),
    };
    let fp32 = gemm_peak(&be, false);
    let tf32 = gemm_peak(&be, true);
    println!("cuBLAS 8192^3 peak: fp32 {fp32:.1} TFLOP/s, tf32 {tf32:.1} TFLOP/s");
    let b = 8;
    let steps = if quick { 3 } else { 8 };
    let dims = Dims::new(50257, 1024, 768, 12);
    let per_token = flops::flops_per_token_llmc(&dims, 12, 1024);
    let mut rows = Vec::new();
    for (mode, on) in [("fp32", false), ("tf32", true)] {
        let be = CudaBackend::open("cuda:0").unwrap();
        be.set_tf32(on).unwrap();
        let (ms, loss) = train_step_ms(&be, b, steps);
        let tok_s = (b * 1024) as f64 / (ms / 1e3);
        let tflops = per_token * tok_s / 1e12;
        let peak = if on { tf32 } else { fp32 };
        println!("GPT-2 124M B={b} T=1024 {mode}: {ms:.1} ms/step, {tok_s:.0} tok/s, {tflops:.1} TFLOP/s, MFU {:.1}% of 989, {:.1}% of measured cuBLAS {mode} peak (loss {loss:.3})", 100.0 * tflops / 989.0, 100.0 * tflops / peak);
        rows.push((mode, ms, tok_s, tflops, peak));
    }
    // Live growth 0 -> 12 on the actor runtime, GPT-2 124M shape.
    let mut r = Rng::new(9);
    let gen = |n: usize, r: &mut Rng| (0..n).map(|_| r.below(50257) as u16).collect::<Vec<u16>>();
    let data = Dataset { train: gen(1 << 22, &mut r), val: gen(1 << 16, &mut r), vocab: 50257 };
    let text = format!(
        "[run]\nname = \"gpu-growth\"\nsteps = 12\nlog_every = 0\nout_dir = \"{}\"\n[data]\ndir = \"unused\"\ntokenizer = \"gpt2\"\nbatch_size = {b}\nseq_len = 1024\n[model]\nchannels = 768\nheads = 12\ndepth = 0\ntarget_depth = 12\n[optim]\nkind = \"adamw\"\n[eval]\nevery = 1000\nbatches = 1\n[placement]\ndevices = [\"cuda:0\"]\n[[growth]]\nat_step = 6\nto_depth = 12\n",
        std::env::temp_dir().join("taproot-gpu-growth").display()
    );
    let cfg = Config::parse(&text, &[]).unwrap();
    let rep = runtime::train::<CudaBackend>(&cfg, data, RunOptions { quiet: true, ..Default::default() }, false).unwrap();
    let step_ms = |depth: usize| {
        let v: Vec<f64> = rep
            .steps
            .windows(2)
            .filter(|w| w[1].depth == depth && w[0].depth == depth)
            .map(|w| (w[1].elapsed_s - w[0].elapsed_s) * 1e3)
            .collect();
        median(v)
    };
    let (d0, d12, g) = (step_ms(0), step_ms(12), rep.growth_wall_s[0] * 1e3);
    println!("actor runtime, growth 0 -> 12 at step 6: depth-0 step {d0:.1} ms, depth-12 step {d12:.1} ms, growth {g:.1} ms");
    // Pipeline parallelism: 12 layers, 4 micro-batches of 2 sequences, on one GPU and split over
    // two (ends and layers 0-5 on cuda:0, 6-11 on cuda:1; hand-offs are peer copies).
    let n_gpus = cuda::device_count().unwrap_or(0);
    let pipe = |devices: &str| -> f64 {
        let text = format!(
            "[run]\nname = \"gpu-pipe\"\nsteps = 10\nlog_every = 0\nout_dir = \"{}\"\n[data]\ndir = \"unused\"\ntokenizer = \"gpt2\"\nbatch_size = 2\nseq_len = 1024\nmicro_batches = 4\n[model]\nchannels = 768\nheads = 12\ndepth = 12\n[optim]\nkind = \"adamw\"\n[eval]\nevery = 1000\nbatches = 1\n[placement]\ndevices = [{devices}]\n",
            std::env::temp_dir().join("taproot-gpu-pipe").display()
        );
        let cfg = Config::parse(&text, &[]).unwrap();
        let mut r = Rng::new(10);
        let data = Dataset { train: gen(1 << 22, &mut r), val: gen(1 << 16, &mut r), vocab: 50257 };
        let rep = runtime::train::<CudaBackend>(&cfg, data, RunOptions { quiet: true, ..Default::default() }, false).unwrap();
        let v: Vec<f64> = rep.steps.windows(2).skip(2).map(|w| (w[1].elapsed_s - w[0].elapsed_s) * 1e3).collect();
        median(v)
    };
    let one = pipe("\"cuda:0\"");
    let two = (n_gpus >= 2).then(|| pipe("\"cuda:0\", \"cuda:1\""));
    match two {
        Some(t) => println!(
            "actor runtime, 12 layers, 4 micro-batches x 2 x 1024: one GPU {one:.1} ms/step, two GPUs {t:.1} ms/step ({:.2}x)",
            one / t
        ),
        None => println!(
            "actor runtime, 12 layers, 4 micro-batches x 2 x 1024: one GPU {one:.1} ms/step; two GPUs skipped ({n_gpus} CUDA device)"
        ),
    }
    println!("\n| what | value |\n|---|---|");
    println!("| cuBLAS fp32 / tf32 peak (8192^3) | {fp32:.1} / {tf32:.1} TFLOP/s |");
    for (mode, ms, tok_s, tflops, peak) in rows {
        println!("| GPT-2 124M, B={b}, T=1024, {mode} | {ms:.1} ms/step, {tok_s:.0} tok/s, {tflops:.1} TFLOP/s, MFU {:.1}% (989) / {:.1}% (measured {mode} peak) |", 100.0 * tflops / 989.0, 100.0 * tflops / peak);
    }
    println!("| growth 0 -> 12 (actor runtime) | {g:.1} ms; step {d0:.1} ms at depth 0, {d12:.1} ms at depth 12 ({:.1}x) |", d12 / d0);
    let tok = (8 * 1024) as f64;
    match two {
        Some(t) => println!("| pipeline, 12 layers, 4 micro-batches | one GPU {one:.1} ms/step ({:.0} tok/s); two GPUs {t:.1} ms/step ({:.0} tok/s), {:.2}x |", tok / one * 1e3, tok / t * 1e3, one / t),
        None => println!("| pipeline, 12 layers, 4 micro-batches | one GPU {one:.1} ms/step ({:.0} tok/s); two GPUs not run ({n_gpus} CUDA device) |", tok / one * 1e3),
    }
}
