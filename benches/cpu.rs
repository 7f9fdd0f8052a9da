//! CPU training-step benchmark: tokens/s and achieved GFLOP/s beside the measured f32 GEMM peak of
//! this machine, every block kind at the demo size, and an op profile of a step. One step =
//! forward + backward + AdamW, fp32, on the shared rayon pool.
//!
//! Run: `scripts/bench-cpu.sh` (or `cargo bench --bench cpu -- [--quick] [--case ID] [--profile]`).
//! Other systems are never quoted from recorded figures: `scripts/bench-torch.sh` runs the PyTorch
//! reference of each case beside this binary's `--emit ID` mode in one invocation, alternating.
//! Protocol (the reference's too): random tokens drawn fresh before each step, outside the timed
//! region; warmup steps discarded; median of the timed steps; AdamW (lr 1e-4, β=(0.9, 0.999),
//! wd 0). FLOPs per token: llm.c's 6·N + 6·L·T·C.

use std::time::Instant;
use taproot::backend::cpu::CpuBackend;
use taproot::backend::{Attention, Backend, Trans};
use taproot::flops;
use taproot::model::init::{InitConfig, InitScheme};
use taproot::model::{Batch, Dims, Model};
use taproot::optim::{OptimConfig, Optimizer, OptimizerKind, Scratch};
use taproot::rng::Rng;

/// A benchmark case: a model of `dims` with `depth` blocks trained on (b, t) batches. `id` names
/// it on the command line (`--case`, `--emit`) and to the PyTorch reference script.
struct Case {
    id: &'static str,
    name: &'static str,
    dims: Dims,
    depth: usize,
    b: usize,
    t: usize,
    warmup: usize,
    steps: usize,
}

/// Every case: GPT-2 at 124M and at the demo size with 6, 1 and 0 blocks, then each other block
/// kind at the demo size (for `--emit` and `--profile`; the plain run times the kinds together in
/// [`kind_cases`]).
fn cases(quick: bool, long: bool) -> Vec<Case> {
    use taproot::model::Arch;
    let steps = if quick {
        5
    } else if long {
        400
    } else {
        15
    };
    let demo = Dims::new(256, 128, 128, 4);
    let gqa = Dims::llama(256, 128, 128, 4, 2, Dims::default_ffn_hidden(128));
    let case = |id, name, dims: &Dims, depth| Case { id, name, dims: dims.clone(), depth, b: 16, t: 128, warmup: 3, steps };
    vec![
        Case {
            id: "gpt2-124m",
            name: "(a) GPT-2 124M shape",
            dims: Dims::new(50257, 1024, 768, 12),
            depth: 12,
            b: 4,
            t: 64,
            warmup: 1,
            steps: if quick { 2 } else { 9 },
        },
        case("demo-6", "(b) demo config, 6 blocks", &demo, 6),
        case("demo-0", "(b') demo config, 0 blocks (the first 80% of a progressive run)", &demo, 0),
        case("demo-1", "(b'') demo config, 1 block", &demo, 1),
        case("llama", "llama GQA at the demo size (kv 2, untied; the llama demo)", &gqa, 6),
        case("qwen3", "qwen3 GQA at the demo size (kv 2, untied, QK-norm)", &gqa.clone().with_arch(Arch::Qwen3), 6),
        case("moe", "llama MoE 8x172 top 2 at the demo size (the moe demo)", &gqa.clone().with_moe(moe_demo()), 6),
    ]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN timings"));
    v[v.len() / 2]
}

/// Best-of-12 GFLOP/s of a 768x768 by 768x3072 f32 product, the faster of two ways the backend
/// has: `Backend::gemm` (one product split over the threads by `gemm`) and a forward product
/// (blocks side by side, as the training step runs its products).
fn gemm_peak(be: &CpuBackend) -> f64 {
    let (m, k, n) = (768, 768, 3072);
    let a = be.alloc(m * k);
    let b = be.alloc(k * n);
    let c = be.alloc(m * n);
    let mut rng = Rng::new(0);
    let mut host = vec![0.0f32; k * n];
    rng.fill_normal(&mut host, 1.0);
    be.upload(CpuBackend::whole(&b), &host);
    be.upload(CpuBackend::whole(&a), &host[..m * k]);
    let w = CpuBackend::whole;
    let mut best = 0.0f64;
    for i in 0..24 {
        let t0 = Instant::now();
        match i % 2 {
            0 => be.gemm(w(&c), w(&a), Trans::N, w(&b), Trans::N, m, n, k, 1.0, 0.0),
            // b read as the (3072, 768) weight of a 768 -> 3072 layer: the same FLOPs.
            _ => be.matmul_forward(w(&c), w(&a), w(&b), None, m, k, n),
        }
        let dt = t0.elapsed().as_secs_f64();
        best = best.max(2.0 * (m * n * k) as f64 / dt / 1e9);
    }
    best
}

/// One model's training loop on random tokens, one timed step at a time (so that cases can be
/// interleaved step by step, which spreads this machine's drift over all of them alike).
struct Trainer {
    model: Model<CpuBackend>,
    opt: Optimizer,
    scratch: Scratch<CpuBackend>,
    rng: Rng,
    windows: Vec<u32>,
    batch: Batch<CpuBackend>,
    ids: (Vec<u32>, Vec<u32>),
    vocab: usize,
}

impl Trainer {
    fn new(be: &CpuBackend, dims: &Dims, depth: usize, b: usize, t: usize) -> Self {
        let init = InitConfig::new(InitScheme::Gpt2, depth.max(1), 1);
        let windows = vec![0u32; b * (t + 1)];
        Trainer {
            model: Model::new(be, dims.clone(), depth, &init),
            opt: Optimizer::new(OptimConfig {
                kind: OptimizerKind::Adamw,
                beta2: 0.999,
                weight_decay: Some(0.0),
                ..OptimConfig::default()
            }),
            scratch: Scratch::default(),
            rng: Rng::new(42),
            batch: Batch::from_windows(be, &windows, b, t),
            windows,
            ids: (Vec::new(), Vec::new()),
            vocab: dims.vocab,
        }
    }

    /// One step (forward, backward, AdamW) on fresh random tokens; its seconds.
    fn step(&mut self, be: &CpuBackend) -> f64 {
        let vocab = self.vocab as u64;
        self.windows.iter_mut().for_each(|w| *w = self.rng.below(vocab) as u32);
        self.batch.load(be, &self.windows, &mut self.ids.0, &mut self.ids.1);
        let dscale = 1.0 / (self.batch.b * self.batch.t) as f32;
        let (m, opt, sc) = (&mut self.model, &self.opt, &mut self.scratch);
        let (batch, t0) = (&self.batch, Instant::now());
        // As the trainers run a step: on the backend's compute pool (`Backend::within`).
        be.within(|| {
            m.forward_backward(be, batch, dscale);
            m.finish_grads(be);
            opt.step(be, &mut m.embed.w, sc, 1e-4);
            for blk in m.blocks.iter_mut() {
                opt.step(be, &mut blk.w, sc, 1e-4);
            }
            opt.step(be, &mut m.head.w, sc, 1e-4);
            m.zero_grad(be);
            be.synchronize();
        });
        t0.elapsed().as_secs_f64()
    }
}

/// Seconds of each of `steps` timed training steps (after `warmup`) of a `depth`-block model of
/// `dims` on batches of (b, t) random tokens.
fn time_steps(be: &CpuBackend, dims: &Dims, depth: usize, b: usize, t: usize, warmup: usize, steps: usize) -> Vec<f64> {
    let mut tr = Trainer::new(be, dims, depth, b, t);
    (0..warmup + steps).map(|_| tr.step(be)).skip(warmup).collect()
}

/// Each block kind at the demo size (C = 128, 6 blocks, B = 16, T = 128, bytes), measured in this
/// run beside GPT-2 of the same parameter count: `llama` with as many key/value heads as query
/// heads has GPT-2's block size to 0.2% (SwiGLU's 3·C·344 against 8·C², no biases); the demo's
/// grouped-query `llama` and `qwen3` have 2 key/value heads (9% fewer block parameters). The MoE
/// case is timed against its dense equivalent, the grouped-query `llama`, whose MLP has the
/// active parameters of 2 of its 8 experts.
fn kind_cases(be: &CpuBackend, quick: bool) {
    use taproot::model::Arch;
    let steps = if quick { 5 } else { 15 };
    println!(
        "\nblock kinds at the demo size (C=128, 6 blocks, B=16, T=128, V=256; AdamW; median of {steps} steps), against GPT-2 in this run:"
    );
    let gpt2 = Dims::new(256, 128, 128, 4);
    let kinds = [
        ("gpt2 (tied)", gpt2.clone()),
        ("llama MHA (kv 4, untied)", Dims::llama(256, 128, 128, 4, 4, Dims::default_ffn_hidden(128))),
        ("llama GQA (kv 2, untied; the llama demo)", Dims::llama(256, 128, 128, 4, 2, Dims::default_ffn_hidden(128))),
        ("qwen3 GQA (kv 2, untied, QK-norm)", Dims::llama(256, 128, 128, 4, 2, Dims::default_ffn_hidden(128)).with_arch(Arch::Qwen3)),
        // The MoE demo: 8 experts of 172 units, 2 per token: the dense GQA llama's active MLP.
        ("llama MoE 8x172 top 2 (the moe demo)", Dims::llama(256, 128, 128, 4, 2, Dims::default_ffn_hidden(128)).with_moe(moe_demo())),
    ];
    // Interleaved: one step of each kind per round, so drift hits every kind alike.
    let mut trainers: Vec<Trainer> = kinds.iter().map(|(_, d)| Trainer::new(be, d, 6, 16, 128)).collect();
    let mut times = vec![Vec::new(); kinds.len()];
    for round in 0..2 + steps {
        for (k, tr) in trainers.iter_mut().enumerate() {
            let dt = tr.step(be);
            if round >= 2 {
                times[k].push(dt);
            }
        }
    }
    // MoE against GQA per round too (their steps run close together, so slow drift cancels),
    // before the medians sort the times.
    let mut per_round: Vec<f64> = times[4].iter().zip(&times[2]).map(|(m, d)| m / d).collect();
    let ms: Vec<f64> = times.iter_mut().map(|t| median(t) * 1e3).collect();
    for ((name, d), ms_k) in kinds.iter().zip(&ms) {
        println!(
            "  {name:<42} {ms_k:8.1} ms/step  block params {:>7}  non-embedding {:>8} (active {:>8})  time {:.2}x gpt2",
            flops::moe_block_params(d).map_or(flops::block_params(d), |p| p.0),
            flops::non_embedding_params(d, 6),
            flops::active_non_embedding_params(d, 6),
            ms_k / ms[0]
        );
    }
    println!(
        "  MoE against its dense equivalent (the same active parameters, llama GQA): {:.2}x the time (median of per-round ratios {:.2}x)",
        ms[4] / ms[2],
        median(&mut per_round)
    );
    // Warm, as one model runs alone: blocks of consecutive steps of each (the first of each block
    // untimed, its caches then hold that model), alternating, the ratio per pair of blocks.
    let (blocks, per_block) = if quick { (3, 3) } else { (6, 4) };
    let mut warm: Vec<f64> = (0..blocks)
        .map(|_| {
            let block = |tr: &mut Trainer| {
                tr.step(be);
                let mut t: Vec<f64> = (0..per_block).map(|_| tr.step(be)).collect();
                median(&mut t)
            };
            let dense = block(&mut trainers[2]);
            block(&mut trainers[4]) / dense
        })
        .collect();
    println!(
        "  the same, warm (blocks of {per_block} consecutive steps of each, alternating, as one model runs alone): {:.2}x (median of {blocks} pairs of blocks; range {:.2}-{:.2})",
        median(&mut warm),
        warm[0],
        warm[blocks - 1]
    );
}

/// config/moe-demo.toml's mixture (its dense first layer aside: every block MoE here).
fn moe_demo() -> taproot::model::moe::Moe {
    use taproot::model::moe::{Moe, Routing};
    Moe { experts: 8, top_k: 2, shared: 0, hidden: 172, routing: Routing::Sigmoid, bias_rate: 0.001, first_dense: 0, aux: 0.0 }
}

fn run_case(be: &CpuBackend, c: &Case, peak: f64) {
    let dims = &c.dims;
    let mut times = time_steps(be, dims, c.depth, c.b, c.t, c.warmup, c.steps);
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min) * 1e3;
    let max = times.iter().cloned().fold(0.0, f64::max) * 1e3;
    let ms = median(&mut times) * 1e3;
    let tokens = (c.b * c.t) as f64;
    let tok_s = tokens / (ms / 1e3);
    let gflops = flops::flops_per_token_llmc(dims, c.depth, c.t) * tokens / (ms / 1e3) / 1e9;
    println!(
        "\n{} (V={}, C={}, NH={}, L={}, B={}, T={}; {} params)",
        c.name,
        dims.vocab,
        dims.channels,
        dims.heads,
        c.depth,
        c.b,
        c.t,
        flops::total_params(dims, c.depth)
    );
    // The peak again after the steps: the higher of the two (this machine's speed drifts).
    let peak = peak.max(gemm_peak(be));
    println!("  taproot    {ms:9.1} ms/step (min {min:.1}, max {max:.1})  {tok_s:9.0} tok/s  {gflops:6.1} GFLOP/s  = {:4.1}% of measured GEMM peak ({peak:.0})", 100.0 * gflops / peak);
}

/// The op profile of case `c`: every backend op's share of a step, summed over the timed steps,
/// beside the measured step time (their difference is the model's host-side work between ops).
fn profile_case(be: &CpuBackend, c: &Case) {
    use taproot::backend::cpu::profile;
    let mut tr = Trainer::new(be, &c.dims, c.depth, c.b, c.t);
    for _ in 0..c.warmup {
        tr.step(be);
    }
    profile::start();
    let total: f64 = (0..c.steps).map(|_| tr.step(be)).sum();
    let rows = profile::stop();
    let n = c.steps as f64;
    let step_ms = total / n * 1e3;
    let ops_ms: f64 = rows.iter().map(|r| r.secs).sum::<f64>() / n * 1e3;
    println!("\nop profile: {} (mean of {} steps: {step_ms:.2} ms/step)", c.name, c.steps);
    println!("  {:<44} {:>8} {:>10} {:>7}", "op", "calls", "ms/step", "share");
    for r in &rows {
        let ms = r.secs / n * 1e3;
        println!("  {:<44} {:>8} {:>10.3} {:>6.1}%", r.op, r.calls / c.steps as u64, ms, 100.0 * ms / step_ms);
    }
    println!("  {:<44} {:>8} {:>10.3} {:>6.1}%", "sum of the ops", "", ops_ms, 100.0 * ops_ms / step_ms);
    println!(
        "  {:<44} {:>8} {:>10.3} {:>6.1}%",
        "outside the ops (host-side model code)",
        "",
        step_ms - ops_ms,
        100.0 * (step_ms - ops_ms) / step_ms
    );
}

/// `--emit ID`: one line of JSON with the milliseconds of each timed step of case ID, for
/// `scripts/bench_torch.py`, which runs the PyTorch reference beside it.
fn emit_case(be: &CpuBackend, c: &Case, warmup: usize, steps: usize) {
    let times = time_steps(be, &c.dims, c.depth, c.b, c.t, warmup, steps);
    let ms: Vec<String> = times.iter().map(|t| format!("{:.4}", t * 1e3)).collect();
    println!("{{\"case\": \"{}\", \"threads\": {}, \"ms\": [{}]}}", c.id, rayon::current_num_threads(), ms.join(", "));
}

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let all = cases(quick, std::env::args().any(|a| a == "--long"));
    let be = CpuBackend::default();
    let find = |id: &str| {
        all.iter().find(|c| c.id == id).unwrap_or_else(|| {
            let ids: Vec<&str> = all.iter().map(|c| c.id).collect();
            eprintln!("no case {id:?}; the cases are {}, and kinds", ids.join(", "));
            std::process::exit(2)
        })
    };
    if let Some(id) = arg("--emit") {
        let num = |name: &str, default: usize| arg(name).map_or(default, |v| v.parse().expect("a whole number of steps"));
        let c = find(&id);
        emit_case(&be, c, num("--warmup", c.warmup), num("--steps", c.steps));
        return;
    }
    // `--case ID` runs one case (`--case kinds`: the block kinds together).
    let only = arg("--case");
    if std::env::args().any(|a| a == "--profile") {
        let ids = ["gpt2-124m", "demo-6", "demo-1", "demo-0"];
        for id in only.as_deref().map_or(ids.to_vec(), |o| vec![o]) {
            profile_case(&be, find(id));
        }
        return;
    }
    println!("taproot CPU benchmark: {} rayon threads", rayon::current_num_threads());
    let peak = gemm_peak(&be);
    println!("measured f32 GEMM peak (768x768 @ 768x3072, best of 12 by gemm and 12 by blocks; again after each case): {peak:.1} GFLOP/s");
    if only.as_deref() != Some("kinds") {
        let ids = ["gpt2-124m", "demo-6", "demo-0", "demo-1"];
        for id in only.as_deref().map_or(ids.to_vec(), |o| vec![o]) {
            run_case(&be, find(id), peak);
        }
    }
    if only.is_none() {
        attention_cases(quick);
    }
    if only.as_ref().is_none_or(|o| o == "kinds") {
        kind_cases(&be, quick);
    }
}

/// Attention forward + backward, materialized against flash (`kernels.attention`), in the same
/// run: median ms and the floats each keeps for its backward.
fn attention_cases(quick: bool) {
    println!("\nattention forward + backward, materialized against flash (fp32, median of {} calls):", if quick { 3 } else { 7 });
    for (b, t, c, nh) in [(16usize, 128usize, 128usize, 4usize), (2, 1024, 256, 4)] {
        let mut row = Vec::new();
        for a in [Attention::Materialized, Attention::Flash] {
            let be = CpuBackend::default();
            be.set_attention(a).unwrap();
            let mut rng = Rng::new(3);
            let mut qkv_h = vec![0.0f32; b * t * 3 * c];
            rng.fill_normal(&mut qkv_h, 1.0);
            let qkv = be.alloc(b * t * 3 * c);
            be.upload(CpuBackend::whole(&qkv), &qkv_h);
            let (out, dout, dqkv) = (be.alloc(b * t * c), be.alloc(b * t * c), be.alloc(b * t * 3 * c));
            be.fill(CpuBackend::whole(&dout), 0.5);
            let (att, datt) = (be.alloc(be.attention_state_len(b, t, nh)), be.alloc(be.attention_scratch_len(b, t, nh)));
            let w = CpuBackend::whole;
            let mut times = Vec::new();
            for _ in 0..if quick { 3 } else { 7 } {
                let t0 = Instant::now();
                be.attention_forward(w(&out), w(&att), w(&qkv), b, t, c, nh);
                be.attention_backward(w(&dqkv), w(&datt), w(&dout), w(&qkv), w(&out), w(&att), b, t, c, nh);
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            row.push((a, median(&mut times), be.attention_state_len(b, t, nh) + be.attention_scratch_len(b, t, nh)));
        }
        let (m, f) = (row[0], row[1]);
        println!(
            "  B={b} T={t} C={c} NH={nh}: materialized {:.2} ms ({} floats kept), flash {:.2} ms ({} floats): time ratio flash/materialized {:.2}, memory ratio {:.4}",
            m.1,
            m.2,
            f.1,
            f.2,
            f.1 / m.1,
            f.2 as f64 / m.2 as f64
        );
    }
}
