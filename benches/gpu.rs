//! GPU benchmark (run by `scripts/gpu-check.sh`; prints SKIP and exits 0 without a GPU).
//!
//! Every figure is measured in this run, on this GPU, and printed beside its baseline:
//! 1. cuBLAS peaks (8192³) in fp32, tf32 and bf16 — the ceilings the step can approach;
//! 2. where a GPT-2 124M step spends its time (B=8, T=1024): every op at its real shapes, in
//!    fp32 and bf16, and their sum against the measured step;
//! 3. the GPT-2 124M training step (T=1024) in fp32 / tf32 / bf16 at B=8 and the largest batch
//!    among 8/16/32/64 that fits: ms/step, tokens/s, TFLOP/s, MFU against 989 TFLOP/s (the
//!    H100/H200 dense bf16 figure), and each precision's speed-up over fp32 and tf32 at B=8;
//! 4. the 0-layer step against the 12-layer step (bf16, B=8);
//! 5. a 0 → 12 progressive run at τ = 0.8·T against a fixed 12-layer run of the same steps, both
//!    on the actor runtime in bf16: wall time and the saving;
//! 6. bf16 against fp32 after 500 steps of the demo model (config/demo.toml; the Shakespeare
//!    shards in data/shakespeare-bytes, or a synthetic corpus where they are missing);
//! 7. the 12-layer actor pipeline, 4 micro-batches, on one GPU;
//! 8. the reference: `benches/gpu_reference.py`, a nanoGPT-style GPT-2 124M in PyTorch (bf16
//!    autocast, `scaled_dot_product_attention`, fused AdamW, `torch.compile`), run here on the
//!    same GPU at B=16 and the largest batch taproot fitted, T=1024: both sides' tokens/s and MFU
//!    (by the same FLOP count) in one table. `TAPROOT_PYTHON` names the interpreter (default
//!    `python3`); where torch is missing the table says so. `--no-reference` leaves it out.
//!
//! Protocol: AdamW; random tokens for the 124M shapes; 2 warm-up steps discarded, median of the
//! timed steps (each ends with a host read of the loss, so the GPU work is inside the timing).
//! FLOPs: llm.c's 6N + 6·L·T·C per token. `--quick` times fewer steps.

use std::time::Instant;
use taproot::backend::cuda::{self, CudaBackend};
use taproot::backend::{Attention, Backend, Precision, Trans};
use taproot::config::Config;
use taproot::data::Dataset;
use taproot::flops;
use taproot::model::init::{InitConfig, InitScheme};
use taproot::model::{Batch, Dims, Model};
use taproot::optim::{OptimConfig, Optimizer, OptimizerKind, Scratch};
use taproot::rng::Rng;
use taproot::runtime::{self, RunOptions};

const PEAK_BF16: f64 = 989.0;
const V: usize = 50257;
const T: usize = 1024;

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A compute mode of the benchmark: a precision, and flash or materialized attention.
#[derive(Clone, Copy, PartialEq)]
struct Mode(Precision, Attention);

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Attention::Flash => write!(f, "{}+flash", self.0),
            Attention::Materialized => write!(f, "{}", self.0),
        }
    }
}

const FP32: Mode = Mode(Precision::Fp32, Attention::Materialized);
const TF32: Mode = Mode(Precision::Tf32, Attention::Materialized);
const BF16: Mode = Mode(Precision::Bf16, Attention::Materialized);
const FLASH: Mode = Mode(Precision::Bf16, Attention::Flash);

fn stream_in(m: Mode) -> CudaBackend {
    runtime::open_stream("cuda:0", runtime::StreamSettings { precision: m.0, attention: m.1, ..Default::default() }).expect("open cuda:0")
}

fn stream(p: Precision) -> CudaBackend {
    stream_in(Mode(p, Attention::Materialized))
}

/// Median wall time (ms) of `f` over `reps` calls after one warm-up, the stream drained around each.
fn time_ms(be: &CudaBackend, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    be.synchronize();
    let mut v = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        f();
        be.synchronize();
        v.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    median(v)
}

fn v(buf: &taproot::backend::cuda::CudaBuf, len: usize) -> taproot::backend::View<'_, taproot::backend::cuda::CudaBuf> {
    taproot::backend::View::new(buf, 0, len)
}

fn gemm_peak(p: Precision) -> f64 {
    let be = stream(p);
    let n = 8192;
    let (a, b, c) = (be.alloc(n * n), be.alloc(n * n), be.alloc(n * n));
    be.fill(CudaBackend::whole(&a), 0.01);
    be.fill(CudaBackend::whole(&b), 0.02);
    let ms = time_ms(&be, 5, || {
        be.gemm(CudaBackend::whole(&c), CudaBackend::whole(&a), Trans::N, CudaBackend::whole(&b), Trans::N, n, n, n, 1.0, 0.0)
    });
    2.0 * (n as f64).powi(3) / (ms / 1e3) / 1e12
}

/// Every op of a GPT-2 124M step at its real shapes (B=8, T=1024): (name, calls per step, ms).
fn op_profile(mode: Mode, b: usize) -> Vec<(String, usize, f64)> {
    let be = stream_in(mode);
    let (c, nh, l) = (768, 12, 12);
    let n = b * T;
    let vp = 50304;
    let w = |len: usize| {
        let x = be.alloc(len);
        be.fill(CudaBackend::whole(&x), 0.01);
        x
    };
    let x = w(n * 4 * c);
    let y = w(n * 4 * c);
    let dx = w(n * 4 * c);
    let wt = w(vp * c);
    let dwt = w(vp * c);
    let bias = w(4 * c);
    let dbias = w(4 * c);
    let logits = w(n * vp);
    let (natt, ndatt) = (be.attention_state_len(b, T, nh), be.attention_scratch_len(b, T, nh));
    let att = w(natt);
    let datt = w(ndatt);
    let qkv = w(n * 3 * c);
    let dqkv = w(n * 3 * c);
    let (mean, rstd) = (w(n), w(n));
    let lnw = w(c);
    let (wpe, dwpe) = (w(T * c), w(T * c));
    let (dlnw, dlnb) = (w(c), w(c));
    let losses = w(n);
    let ids = be.alloc_ids(n);
    let reps = 5;
    let mut rows: Vec<(String, usize, f64)> = Vec::new();
    for (name, ic, oc) in [
        ("matmul qkv 768->2304", c, 3 * c),
        ("matmul attn-proj 768->768", c, c),
        ("matmul fc 768->3072", c, 4 * c),
        ("matmul fc-proj 3072->768", 4 * c, c),
    ] {
        let f = time_ms(&be, reps, || be.matmul_forward(v(&y, n * oc), v(&x, n * ic), v(&wt, oc * ic), Some(v(&bias, oc)), n, ic, oc));
        let bw = time_ms(&be, reps, || {
            be.matmul_backward(
                Some(v(&dx, n * ic)),
                v(&dwt, oc * ic),
                Some(v(&dbias, oc)),
                v(&y, n * oc),
                v(&x, n * ic),
                v(&wt, oc * ic),
                n,
                ic,
                oc,
            )
        });
        rows.push((name.to_string(), l, f));
        rows.push((format!("{name} backward"), l, bw));
    }
    let f = time_ms(&be, reps, || be.attention_forward(v(&y, n * c), v(&att, natt), v(&qkv, n * 3 * c), b, T, c, nh));
    rows.push(("attention".into(), l, f));
    let bw = time_ms(&be, reps, || {
        be.attention_backward(
            v(&dqkv, n * 3 * c),
            v(&datt, ndatt),
            v(&y, n * c),
            v(&qkv, n * 3 * c),
            v(&dx, n * c),
            v(&att, natt),
            b,
            T,
            c,
            nh,
        )
    });
    rows.push(("attention backward".into(), l, bw));
    let f = time_ms(&be, reps, || be.layernorm_forward(v(&y, n * c), v(&mean, n), v(&rstd, n), v(&x, n * c), v(&lnw, c), v(&lnw, c), n, c));
    rows.push(("layernorm".into(), 2 * l + 1, f));
    let bw = time_ms(&be, reps, || {
        be.layernorm_backward(
            v(&dx, n * c),
            v(&dlnw, c),
            v(&dlnb, c),
            v(&y, n * c),
            v(&x, n * c),
            v(&lnw, c),
            v(&mean, n),
            v(&rstd, n),
            n,
            c,
        )
    });
    rows.push(("layernorm backward".into(), 2 * l + 1, bw));
    let f = time_ms(&be, reps, || be.gelu_forward(v(&y, n * 4 * c), v(&x, n * 4 * c)));
    rows.push(("gelu".into(), l, f));
    let bw = time_ms(&be, reps, || be.gelu_backward(v(&dx, n * 4 * c), v(&x, n * 4 * c), v(&y, n * 4 * c)));
    rows.push(("gelu backward".into(), l, bw));
    let f = time_ms(&be, reps, || be.add(v(&y, n * c), v(&x, n * c), v(&dx, n * c)));
    rows.push(("residual add (and its backward)".into(), 4 * l, f));
    let f = time_ms(&be, reps, || be.matmul_forward(v(&logits, n * vp), v(&x, n * c), v(&wt, vp * c), None, n, c, vp));
    rows.push(("head matmul 768->50304".into(), 1, f));
    let bw = time_ms(&be, reps, || {
        be.matmul_backward(Some(v(&dx, n * c)), v(&dwt, vp * c), None, v(&logits, n * vp), v(&x, n * c), v(&wt, vp * c), n, c, vp)
    });
    rows.push(("head matmul backward".into(), 1, bw));
    let f = time_ms(&be, reps, || be.crossentropy_forward_backward(v(&logits, n * vp), v(&losses, n), &ids, 1.0 / n as f32, n, V, vp));
    rows.push(("softmax + cross-entropy (fused)".into(), 1, f));
    let f = time_ms(&be, reps, || be.encoder_forward(v(&y, n * c), &ids, v(&wt, vp * c), Some(v(&wpe, T * c)), b, T, c));
    rows.push(("embedding".into(), 1, f));
    let bw = time_ms(&be, reps, || be.encoder_backward(v(&dwt, vp * c), Some(v(&dwpe, T * c)), v(&y, n * c), &ids, b, T, c));
    rows.push(("embedding backward".into(), 1, bw));
    // AdamW over the 124M parameters in the trainer's unit sizes: 12 blocks of 7.1M, 38.6M + 0.8M ends.
    let params = w(7_087_872);
    let (g, m, vv) = (w(7_087_872), w(7_087_872), w(7_087_872));
    let f = time_ms(&be, reps, || {
        be.adamw_update(v(&params, 7_087_872), v(&g, 7_087_872), v(&m, 7_087_872), v(&vv, 7_087_872), 1e-4, 0.9, 0.95, 1e-8, 0.1, 3)
    });
    rows.push(("adamw, one block (7.1M)".into(), l + 6, f));
    rows
}

/// Median step time (ms) and last loss of GPT-2 124M at B x 1024 and `depth` layers, or None if it
/// does not fit in memory.
fn train_step_ms(mode: Mode, b: usize, depth: usize, steps: usize) -> Option<(f64, f32)> {
    let r = std::panic::catch_unwind(|| {
        let be = stream_in(mode);
        let dims = Dims::new(V, T, 768, 12);
        let mut model = Model::new(&be, dims, depth, &InitConfig::new(InitScheme::Gpt2, 12, 1));
        let opt = Optimizer::new(OptimConfig { kind: OptimizerKind::Adamw, ..OptimConfig::default() });
        let mut scratch = Scratch::default();
        let mut rng = Rng::new(5);
        let mut windows = vec![0u32; b * (T + 1)];
        let mut batch = Batch::from_windows(&be, &windows, b, T);
        let (mut ti, mut tt) = (Vec::new(), Vec::new());
        let mut times = Vec::new();
        let mut loss = 0.0;
        for i in 0..steps + 2 {
            windows.iter_mut().for_each(|w| *w = rng.below(V as u64) as u32);
            batch.load(&be, &windows, &mut ti, &mut tt);
            let t0 = Instant::now();
            loss = model.forward_backward(&be, &batch, 1.0 / (b * T) as f32);
            model.finish_grads(&be);
            opt.step(&be, &mut model.embed.w, &mut scratch, 3e-4);
            for blk in model.blocks.iter_mut() {
                opt.step(&be, &mut blk.w, &mut scratch, 3e-4);
            }
            opt.step(&be, &mut model.head.w, &mut scratch, 3e-4);
            model.zero_grad(&be);
            be.synchronize();
            if i >= 2 {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        (median(times), loss)
    });
    r.ok()
}

fn gen(n: usize, r: &mut Rng) -> Vec<u16> {
    (0..n).map(|_| r.below(V as u64) as u16).collect()
}

fn gpt2_run(name: &str, p: Mode, b: usize, steps: u64, depth: usize, growth_at: Option<u64>, extra: &str) -> taproot::train::TrainReport {
    let cfg = gpt2_cfg(name, p, b, steps, depth, growth_at, extra);
    let mut r = Rng::new(9);
    let data = Dataset::in_memory(gen(1 << 22, &mut r), gen(1 << 16, &mut r), V);
    runtime::train::<CudaBackend>(&cfg, data, RunOptions { quiet: true, ..Default::default() }, false).unwrap()
}

fn gpt2_cfg(name: &str, p: Mode, b: usize, steps: u64, depth: usize, growth_at: Option<u64>, extra: &str) -> Config {
    let growth = growth_at.map(|s| format!("[[growth]]\nat_step = {s}\nto_depth = 12\n")).unwrap_or_default();
    let text = format!(
        "[run]\nname = \"{name}\"\nsteps = {steps}\nlog_every = 0\nout_dir = \"{}\"\n[data]\ndir = \"unused\"\ntokenizer = \"gpt2\"\nbatch_size = {b}\nseq_len = 1024\n{extra}[model]\nchannels = 768\nheads = 12\ndepth = {depth}\ntarget_depth = 12\n[optim]\nkind = \"adamw\"\n[eval]\nevery = 100000\nbatches = 1\n[checkpoint]\nevery = 0\n[precision]\ncompute = \"{}\"\n[kernels]\nattention = \"{}\"\n[placement]\ndevices = [\"cuda:0\"]\n{growth}",
        std::env::temp_dir().join(format!("taproot-gpu-{name}")).display(),
        p.0,
        p.1.name()
    );
    Config::parse(&text, &[]).unwrap_or_else(|e| panic!("bench config {name}: {e:#}"))
}

fn step_ms_at(rep: &taproot::train::TrainReport, depth: usize) -> f64 {
    median(
        rep.steps
            .windows(2)
            .filter(|w| w[1].depth == depth && w[0].depth == depth)
            .map(|w| (w[1].elapsed_s - w[0].elapsed_s) * 1e3)
            .collect(),
    )
}

/// The demo model (config/demo.toml) for `steps` steps in precision `p`: (last val loss, mean
/// train loss of the last 50 steps, which data).
fn demo_cfg(p: Precision, steps: u64) -> Config {
    let dir = std::env::temp_dir().join(format!("taproot-gpu-demo-{p}"));
    let text = std::fs::read_to_string("config/demo.toml").expect("config/demo.toml");
    let sets = [
        format!("run.steps={steps}"),
        "run.log_every=0".into(),
        format!("run.out_dir=\"{}\"", dir.display()),
        format!("eval.every={}", steps / 2),
        "placement.devices=[\"cuda:0\"]".into(),
        format!("precision.compute=\"{p}\""),
        "checkpoint.every=0".into(),
    ];
    Config::parse(&text, &sets).unwrap_or_else(|e| panic!("demo config: {e:#}"))
}

fn demo_run(p: Precision, steps: u64) -> (f32, f32, String) {
    let shards = std::path::Path::new("data/shakespeare-bytes");
    let (data, which) = match Dataset::open(shards, 256) {
        Ok(d) => (d, "Shakespeare bytes".to_string()),
        Err(_) => {
            let syn = std::env::temp_dir().join("taproot-gpu-words");
            taproot::data::synthetic::word_corpus(&syn).unwrap();
            (Dataset::open(&syn, 256).unwrap(), "synthetic words (data/shakespeare-bytes missing)".to_string())
        }
    };
    let cfg = demo_cfg(p, steps);
    let rep = runtime::train::<CudaBackend>(&cfg, data, RunOptions { quiet: true, ..Default::default() }, false).unwrap();
    let tail: Vec<f32> = rep.steps.iter().rev().take(50).map(|s| s.train_loss).collect();
    (rep.final_val_loss().unwrap_or(f32::NAN), tail.iter().sum::<f32>() / tail.len() as f32, which)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--check-configs") {
        // Parse every config the benchmark builds (no GPU needed): CI runs this.
        gpt2_cfg("prog", FLASH, 8, 50, 0, Some(40), "");
        gpt2_cfg("pipe", FLASH, 2, 10, 12, None, "micro_batches = 4\n");
        demo_cfg(Precision::Bf16, 500);
        return println!("benchmark configs parse");
    }
    match cuda::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => return println!("SKIP: no CUDA device"),
        Err(e) => return println!("SKIP: {e:#}"),
    }
    let steps = if quick { 3 } else { 6 };
    let mut table: Vec<(String, String)> = Vec::new();

    // 1. peaks
    let peaks: Vec<(Precision, f64)> = [Precision::Fp32, Precision::Tf32, Precision::Bf16].iter().map(|&p| (p, gemm_peak(p))).collect();
    for (p, t) in &peaks {
        println!("cuBLAS 8192^3 {p}: {t:.1} TFLOP/s");
    }
    table.push((
        "cuBLAS 8192³ peak fp32 / tf32 / bf16".into(),
        format!("{:.1} / {:.1} / {:.1} TFLOP/s (bf16 includes converting the fp32 operands)", peaks[0].1, peaks[1].1, peaks[2].1),
    ));

    // 1b. the linear forward with a bias: one cuBLASLt call against the cuBLAS product and the
    // bias kernel, in this run (B=8, T=1024, the 124M step's three shapes with a bias)
    println!("\nlinear forward with a bias, B=8 T=1024: cuBLASLt's BIAS epilogue against cuBLAS + the bias kernel");
    let mut lt_rows = Vec::new();
    for p in [Precision::Fp32, Precision::Bf16] {
        let be = stream(p);
        let n = 8 * T;
        for (c, oc) in [(768, 2304), (768, 3072), (3072, 768)] {
            let (x, w, b, out) = (be.alloc(n * c), be.alloc(oc * c), be.alloc(oc), be.alloc(n * oc));
            for (buf, val) in [(&x, 0.01), (&w, 0.02), (&b, 0.1)] {
                be.fill(CudaBackend::whole(buf), val);
            }
            let mut ms = [0.0; 2];
            for (i, on) in [false, true].into_iter().enumerate() {
                cuda::set_cublaslt(on);
                ms[i] = time_ms(&be, 20, || be.matmul_forward(v(&out, n * oc), v(&x, n * c), v(&w, oc * c), Some(v(&b, oc)), n, c, oc));
            }
            let tflops = |ms: f64| 2.0 * (n * c * oc) as f64 / (ms / 1e3) / 1e12;
            println!(
                "  {p} {c}->{oc}: cuBLAS + bias {:.3} ms ({:.0} TFLOP/s), cuBLASLt {:.3} ms ({:.0} TFLOP/s): {:.2}x",
                ms[0],
                tflops(ms[0]),
                ms[1],
                tflops(ms[1]),
                ms[0] / ms[1]
            );
            lt_rows.push(format!("{p} {c}→{oc} {:.2}×", ms[0] / ms[1]));
        }
        // The MLP's first product with its GELU: GELU_AUX_BIAS against the product, the bias
        // kernel and the GELU kernel.
        let (c, oc) = (768, 3072);
        let (x, w, b, out, pre) = (be.alloc(n * c), be.alloc(oc * c), be.alloc(oc), be.alloc(n * oc), be.alloc(n * oc));
        for (buf, val) in [(&x, 0.01), (&w, 0.02), (&b, 0.1)] {
            be.fill(CudaBackend::whole(buf), val);
        }
        let mut ms = [0.0; 2];
        for (i, on) in [false, true].into_iter().enumerate() {
            cuda::set_cublaslt(on);
            ms[i] = time_ms(&be, 20, || {
                be.matmul_forward_gelu(v(&out, n * oc), v(&pre, n * oc), v(&x, n * c), v(&w, oc * c), Some(v(&b, oc)), n, c, oc)
            });
        }
        println!("  {p} {c}->{oc} + GELU: kernels {:.3} ms, cuBLASLt GELU_AUX_BIAS {:.3} ms: {:.2}x", ms[0], ms[1], ms[0] / ms[1]);
        lt_rows.push(format!("{p} {c}→{oc}+GELU {:.2}×", ms[0] / ms[1]));
    }
    cuda::set_cublaslt(true);
    table.push(("linear forward + bias (+ GELU): cuBLASLt epilogue speed-up over cuBLAS + kernels".into(), lt_rows.join(", ")));

    // 2. op profile
    let dims = Dims::new(V, T, 768, 12);
    let per_token = flops::flops_per_token_llmc(&dims, 12, T);
    let mut profile_sum = Vec::new();
    for mode in [FP32, BF16, FLASH] {
        let rows = op_profile(mode, 8);
        println!("\nwhere a GPT-2 124M step goes, {mode}, B=8 T=1024 (ms per call x calls per step):");
        let mut total = 0.0;
        for (name, calls, ms) in &rows {
            println!("  {name:<36} {ms:8.3} ms x {calls:2} = {:8.2} ms", ms * *calls as f64);
            total += ms * *calls as f64;
        }
        println!("  {:<36} {total:8.2} ms", "sum");
        profile_sum.push((mode, total));
    }

    // 3. the training step: B=8 in every mode, and the largest batch that fits
    let mut b8: Vec<(Mode, f64)> = Vec::new();
    let mut flash_ms: Vec<(usize, f64)> = Vec::new();
    println!();
    for mode in [FP32, TF32, BF16, FLASH] {
        let batches: &[usize] = if mode == FLASH { &[64, 32, 16, 8] } else { &[64, 32, 8] };
        let mut fitted = false;
        for &b in batches {
            if fitted && b != 8 && mode != FLASH {
                continue;
            }
            match train_step_ms(mode, b, 12, if b >= 32 { steps.min(4) } else { steps }) {
                Some((ms, loss)) => {
                    let tok_s = (b * T) as f64 / (ms / 1e3);
                    let tflops = per_token * tok_s / 1e12;
                    let mfu = 100.0 * tflops / PEAK_BF16;
                    println!(
                        "GPT-2 124M {mode} B={b}: {ms:.1} ms/step, {tok_s:.0} tok/s, {tflops:.1} TFLOP/s, MFU {mfu:.1}% (loss {loss:.3})"
                    );
                    table.push((
                        format!("GPT-2 124M, {mode}, B={b}, T=1024"),
                        format!("{ms:.1} ms/step, {tok_s:.0} tok/s, {tflops:.1} TFLOP/s, MFU {mfu:.1}%"),
                    ));
                    if b == 8 {
                        b8.push((mode, ms));
                    }
                    if mode == FLASH {
                        flash_ms.push((b, ms));
                    }
                    fitted = true;
                }
                None => println!("GPT-2 124M {mode} B={b}: does not fit (allocation failed)"),
            }
        }
    }
    let at = |m: Mode| b8.iter().find(|(q, _)| *q == m).map(|x| x.1).unwrap_or(f64::NAN);
    for m in [BF16, FLASH] {
        table.push((
            format!("{m} speed-up at B=8 (same run)"),
            format!("{:.2}x over fp32, {:.2}x over tf32 (target: 4x over tf32)", at(FP32) / at(m), at(TF32) / at(m)),
        ));
    }
    for (m, sum) in &profile_sum {
        table.push((format!("sum of the op profile, {m}, B=8"), format!("{sum:.1} ms against a measured step of {:.1} ms", at(*m))));
    }

    // 4. depth 0 against depth 12
    let best = FLASH;
    let d0 = train_step_ms(best, 8, 0, steps).map(|x| x.0).unwrap_or(f64::NAN);
    let d12 = at(best);
    println!("{best} B=8: depth-0 step {d0:.1} ms, depth-12 step {d12:.1} ms ({:.1}%)", 100.0 * d0 / d12);
    table.push((
        format!("0-layer step / 12-layer step, {best}, B=8"),
        format!("{d0:.1} / {d12:.1} ms = {:.1}% (target ≤ 10%)", 100.0 * d0 / d12),
    ));
    let mfu0 = 100.0 * flops::flops_per_token_llmc(&dims, 0, T) * (8 * T) as f64 / (d0 / 1e3) / 1e12 / PEAK_BF16;
    table.push((format!("0-layer step's MFU on its own FLOPs, {best}, B=8"), format!("{mfu0:.1}% (target ≥ 35%)")));

    // 5. progressive against fixed, actor runtime: the time to the last step's end (start-up,
    // evaluation and the final checkpoint excluded; the growth itself included)
    let n = 50u64;
    let tau = n * 4 / 5;
    let prog = gpt2_run("prog", best, 8, n, 0, Some(tau), "");
    let fixed = gpt2_run("fixed", best, 8, n, 12, None, "");
    let end = |r: &taproot::train::TrainReport| r.steps.last().map_or(f64::NAN, |s| s.elapsed_s);
    let (tp, tf) = (end(&prog), end(&fixed));
    let saving = 1.0 - tp / tf;
    println!(
        "actor runtime {best} B=8, {n} steps: progressive 0 -> 12 at step {tau} {tp:.2} s, fixed 12 {tf:.2} s: saving {:.1}% (steps at depth 0 {:.1} ms, depth 12 {:.1} ms, growth {:.0} ms)",
        100.0 * saving,
        step_ms_at(&prog, 0),
        step_ms_at(&fixed, 12),
        prog.growth_wall_s.first().copied().unwrap_or(f64::NAN) * 1e3
    );
    table.push((
        format!("0 → 12 at τ = 0.8·T against fixed 12, {n} steps (actor runtime, {best}, B=8)"),
        format!("{tp:.2} s against {tf:.2} s to the last step: {:.1}% of the wall time saved", 100.0 * saving),
    ));

    // 6. bf16 against fp32, demo model, 500 steps
    let (v32, t32, which) = demo_run(Precision::Fp32, 500);
    let (v16, t16, _) = demo_run(Precision::Bf16, 500);
    let dv = 100.0 * (v16 - v32) / v32;
    let dt = 100.0 * (t16 - t32) / t32;
    println!("demo model, 500 steps on {which}: val loss fp32 {v32:.4} bf16 {v16:.4} ({dv:+.2}%); train loss (last 50) fp32 {t32:.4} bf16 {t16:.4} ({dt:+.2}%)");
    table.push((
        format!("demo model, 500 steps ({which}): bf16 against fp32"),
        format!("val loss {v16:.4} / {v32:.4} ({dv:+.2}%), train loss {t16:.4} / {t32:.4} ({dt:+.2}%) (target within 1%)"),
    ));

    // 7. the pipeline
    let rep = gpt2_run("pipe", best, 2, 10, 12, None, "micro_batches = 4\n");
    let one = median(rep.steps.windows(2).skip(2).map(|w| (w[1].elapsed_s - w[0].elapsed_s) * 1e3).collect());
    println!("actor runtime, 12 layers, 4 micro-batches x 2 x 1024, {best}: one GPU {one:.1} ms/step");
    table.push((
        format!("pipeline, 12 layers, 4 micro-batches of 2, {best}, one GPU"),
        format!("{one:.1} ms/step ({:.0} tok/s)", 8.0 * 1024.0 / one * 1e3),
    ));

    // 8. the PyTorch reference, same GPU, same run
    if !std::env::args().any(|a| a == "--no-reference") {
        let largest = flash_ms.iter().map(|x| x.0).max().unwrap_or(16);
        let batches: Vec<usize> = if largest > 16 { vec![16, largest] } else { vec![16] };
        match pytorch_reference(&batches, if quick { 5 } else { 10 }) {
            Ok(rows) => {
                for (b, theirs) in rows {
                    let ours = flash_ms.iter().find(|x| x.0 == b).map(|x| x.1);
                    let tok = |ms: f64| (b * T) as f64 / (ms / 1e3);
                    let mfu = |ms: f64| 100.0 * per_token * tok(ms) / 1e12 / PEAK_BF16;
                    let side =
                        |ms: Option<f64>| ms.map_or("did not run".to_string(), |ms| format!("{:.0} tok/s, MFU {:.1}%", tok(ms), mfu(ms)));
                    let ratio = match (ours, theirs) {
                        (Some(a), Some(p)) => format!("taproot ÷ PyTorch tokens/s = {:.2}", p / a),
                        _ => "no ratio".into(),
                    };
                    println!("GPT-2 124M B={b}: taproot {} | PyTorch compiled {} | {ratio}", side(ours), side(theirs));
                    table.push((
                        format!("GPT-2 124M, B={b}, T=1024: taproot {best} | PyTorch (compiled, bf16 autocast, SDPA, fused AdamW)"),
                        format!(
                            "{} \\| {} \\| {ratio} (targets: MFU ≥ 40% at B=16, ≥ 45% at the largest; ratio ≥ 1)",
                            side(ours),
                            side(theirs)
                        ),
                    ));
                }
            }
            Err(e) => {
                println!("PyTorch reference: {e}");
                table.push(("PyTorch reference (benches/gpu_reference.py)".into(), format!("not run: {e}")));
            }
        }
    }

    println!("\n| what | value |\n|---|---|");
    for (k, v) in table {
        println!("| {k} | {v} |");
    }
}

/// Run `benches/gpu_reference.py` at `batches` (T=1024) on this GPU: each batch's median ms per
/// step, None for a batch that did not fit. An error says why the reference could not run.
fn pytorch_reference(batches: &[usize], steps: usize) -> Result<Vec<(usize, Option<f64>)>, String> {
    let local = std::path::Path::new("benches/gpu_reference.py");
    let script = if local.exists() { local.to_path_buf() } else { std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(local) };
    let python = std::env::var("TAPROOT_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&script).arg("--seq").arg(T.to_string()).arg("--steps").arg(steps.to_string()).arg("--batch");
    cmd.args(batches.iter().map(|b| b.to_string()));
    let out = cmd.output().map_err(|e| format!("{python} {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    if !out.status.success() {
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        return Err(format!("{python} {} exited with {}: {last}", script.display(), out.status));
    }
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("a line of the reference's output ({line}): {e}"))?;
        let b = v["batch"].as_u64().ok_or_else(|| format!("no batch in {line}"))? as usize;
        rows.push((b, v["ms"].as_f64()));
    }
    if rows.is_empty() {
        return Err("the reference printed no results".into());
    }
    Ok(rows)
}
