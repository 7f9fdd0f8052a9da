//! The CUDA backend.
//!
//! Without a GPU (CI): every NVRTC kernel compiles to PTX for sm_90 (needs libnvrtc on
//! LD_LIBRARY_PATH — `.ci/run` installs the `nvidia-cuda-nvrtc` pip package — and with
//! `TAPROOT_REQUIRE_NVRTC=1` a missing libnvrtc fails instead of skipping), a broken kernel is
//! rejected, and asking for a CUDA device where there is none is a clear error.
//!
//! With a GPU (`scripts/gpu-check.sh`; each test prints SKIP and returns where there is none):
//! every op forward and backward against the CPU reference on fresh random inputs (relative
//! error ‖gpu − cpu‖ / ‖cpu‖ ≤ 1e-5 in fp32; in tf32 and bf16 the products against the CPU's
//! emulation of the same precision and against fp32, within stated bounds), a bf16 training run
//! with growth against fp32 and the CPU's bf16, the actor runtime in bf16, a
//! whole training run with a growth event
//! against the CPU trainer, every growth operator building the CPU's block bit for bit, the
//! actor runtime on the GPU, a two-stream hand-off that needs its
//! event wait, token-id uploads through the pinned staging ring, a GPU checkpoint resumed on the
//! CPU, and the daemon on a CUDA config. With two GPUs (they print SKIP with fewer): a peer copy
//! ordered by its event, and the pipeline across two GPUs against the same run on one.

mod common;

use common::{fox_dataset as dataset, gpu, tiny_gpu_cfg as tiny_cfg, TestConfig};
use taproot::backend::cpu::CpuBackend;
use taproot::backend::cuda::{self, CudaBackend};
use taproot::backend::{Backend, Trans, View};
use taproot::rng::Rng;

#[test]
fn every_kernel_compiles_to_ptx_for_sm_90() {
    if !cuda::nvrtc_present() {
        if std::env::var("TAPROOT_REQUIRE_NVRTC").is_ok() {
            panic!("TAPROOT_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH)");
        }
        println!("SKIP: libnvrtc not found (install nvidia-cuda-nvrtc and add nvidia/cu13/lib to LD_LIBRARY_PATH)");
        return;
    }
    let ptx = cuda::compile_kernels("sm_90").unwrap();
    let text = ptx.to_src();
    for name in cuda::KERNEL_NAMES {
        assert!(text.contains(&format!(".entry {name}(")), "kernel {name} missing from the PTX");
    }
    println!("{} kernels compiled to {} bytes of PTX for sm_90", cuda::KERNEL_NAMES.len(), text.len());
    // And a syntax error is an error, not a silent success.
    let broken = cudarc::nvrtc::compile_ptx_with_opts(
        "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        cudarc::nvrtc::CompileOptions { arch: Some("sm_90"), ..Default::default() },
    );
    assert!(broken.is_err(), "NVRTC accepted a broken kernel");
}

#[test]
fn asking_for_a_missing_cuda_device_is_a_clear_error() {
    let err = match CudaBackend::open(if cuda::driver_present() { "cuda:999" } else { "cuda:0" }) {
        Ok(_) => panic!("opened a device that cannot exist"),
        Err(e) => format!("{e:#}"),
    };
    println!("error: {err}");
    assert!(err.contains("LD_LIBRARY_PATH") || err.contains("does not exist"), "unclear: {err}");
    let err = CudaBackend::open("gpu0").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("gpu0"), "a malformed device name must be named: {err}");
}

// ------------------------------------------------------------------------------------------
// op parity

fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v, std);
    v
}

fn up<B: Backend>(be: &B, h: &[f32]) -> B::Buf {
    let b = be.alloc(h.len());
    be.upload(B::whole(&b), h);
    b
}

fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    let mut h = vec![0.0; B::buf_len(b)];
    be.download(B::whole(b), &mut h);
    h
}

fn ids<B: Backend>(be: &B, h: &[u32]) -> B::Ids {
    let b = be.alloc_ids(h.len());
    be.upload_ids(&b, h);
    b
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Run `case` on the CPU reference and on the GPU and compare every output it returns.
macro_rules! parity {
    ($name:ident, $tol:expr, |$be:ident: $B:ident| $body:block) => {
        #[test]
        fn $name() {
            fn case<$B: Backend>($be: &$B) -> Vec<(&'static str, Vec<f32>)> $body
            let Some(g) = gpu() else { return };
            let want = case(&CpuBackend::default());
            let got = case(&g);
            for ((name, w), (_, x)) in want.iter().zip(&got) {
                let r = rel(x, w);
                println!("{:<36} {:<12} relative error {r:.2e}", stringify!($name), name);
                assert!(r <= $tol, "{}: {name}: relative error {r:.3e} > {:e}", stringify!($name), $tol);
            }
        }
    };
}

const TOL: f64 = 1e-5;
const B_: usize = 2;
const T_: usize = 64;
const C_: usize = 128;
const NH_: usize = 4;

parity!(matmul_forward_backward_match_cpu, TOL, |be: B| {
    let mut r = Rng::new(1);
    let (n, c, oc) = (B_ * T_, C_, 3 * C_);
    let (inp, w, bias, dout) = (
        up(be, &randn(&mut r, n * c, 1.0)),
        up(be, &randn(&mut r, oc * c, 0.1)),
        up(be, &randn(&mut r, oc, 0.1)),
        up(be, &randn(&mut r, n * oc, 1.0)),
    );
    let out = be.alloc(n * oc);
    be.matmul_forward(B::whole(&out), B::whole(&inp), B::whole(&w), Some(B::whole(&bias)), n, c, oc);
    let (dinp, dw, db) = (be.alloc(n * c), up(be, &randn(&mut r, oc * c, 1.0)), up(be, &randn(&mut r, oc, 1.0)));
    be.matmul_backward(Some(B::whole(&dinp)), B::whole(&dw), Some(B::whole(&db)), B::whole(&dout), B::whole(&inp), B::whole(&w), n, c, oc);
    vec![("out", down(be, &out)), ("dinp", down(be, &dinp)), ("dw", down(be, &dw)), ("db", down(be, &db))]
});

parity!(gemm_all_transposes_match_cpu, TOL, |be: B| {
    let mut r = Rng::new(2);
    let (m, n, k) = (48, 80, 64);
    let mut outs = Vec::new();
    for (ta, tb, name) in [(Trans::N, Trans::N, "NN"), (Trans::T, Trans::N, "TN"), (Trans::N, Trans::T, "NT"), (Trans::T, Trans::T, "TT")] {
        let (a, b) = (up(be, &randn(&mut r, m * k, 1.0)), up(be, &randn(&mut r, k * n, 1.0)));
        let c = up(be, &randn(&mut r, m * n, 1.0));
        be.gemm(B::whole(&c), B::whole(&a), ta, B::whole(&b), tb, m, n, k, 0.7, 0.3);
        outs.push((name, down(be, &c)));
    }
    outs
});

parity!(moe_block_forward_backward_match_cpu, 1e-4, |be: B| {
    // A llama MoE block: routing on the host from the device's logits, gather_rows, each expert
    // on its rows, moe_combine and its backward, the shared expert.
    use taproot::model::moe::{Mlp, Moe, Routing};
    let mut r = Rng::new(34);
    let m = Moe { experts: 4, top_k: 2, shared: 1, hidden: C_, routing: Routing::Softmax, bias_rate: 0.0, first_dense: 0, aux: 0.0 };
    let dims = taproot::model::Dims::llama(67, T_, C_, NH_, NH_ / 2, 2 * C_).with_moe(m);
    block_outputs(be, &dims, Mlp::Moe, &mut r)
});

/// One block of `dims` (MLP `mlp`) with random weights: its output, input gradient and
/// parameter gradients on `be`.
fn block_outputs<Be: Backend>(
    be: &Be,
    dims: &taproot::model::Dims,
    mlp: taproot::model::moe::Mlp,
    r: &mut Rng,
) -> Vec<(&'static str, Vec<f32>)> {
    let mut blk = taproot::model::Block::new_empty_mlp(be, dims, 0, mlp);
    let n_params = blk.w.layout.total;
    blk.w.params_from_host(be, &randn(r, n_params, 0.05));
    let x = up(be, &randn(r, B_ * T_ * C_, 1.0));
    let y = blk.forward(be, 0, x, B_, T_);
    let y_host = down(be, &y);
    let dx = blk.backward(be, 0, up(be, &randn(r, B_ * T_ * C_, 1.0)));
    vec![("y", y_host), ("dx", down(be, &dx)), ("grads", blk.w.grads_to_host(be))]
}

parity!(head_rmsnorm_matches_cpu, TOL, |be: B| {
    // QK-norm on the k heads of fused qkv rows: a view that starts inside the row.
    let mut r = Rng::new(33);
    let (n, hd, kv) = (B_ * T_, C_ / NH_, NH_ / 2);
    let stride = (NH_ + 2 * kv) * hd;
    let inp = up(be, &randn(&mut r, n * stride, 1.0));
    let w = up(be, &randn(&mut r, hd, 0.2).iter().map(|x| 1.0 + x).collect::<Vec<_>>());
    let (out, rstd) = (up(be, &vec![0.0; n * stride]), be.alloc(n * kv));
    let k = |buf| B::whole(buf).sub(NH_ * hd, n * stride - NH_ * hd);
    be.head_rmsnorm_forward(k(&out), B::whole(&rstd), k(&inp), B::whole(&w), n, stride, kv, hd, 1e-6);
    let (d, dw) = (up(be, &randn(&mut r, n * stride, 1.0)), up(be, &randn(&mut r, hd, 1.0)));
    be.head_rmsnorm_backward(k(&d), B::whole(&dw), k(&inp), B::whole(&w), B::whole(&rstd), n, stride, kv, hd);
    vec![("out", down(be, &out)), ("rstd", down(be, &rstd)), ("d", down(be, &d)), ("dw", down(be, &dw))]
});

parity!(rmsnorm_rope_gqa_swiglu_match_cpu, TOL, |be: B| {
    let mut r = Rng::new(31);
    let (n, c, f) = (B_ * T_, C_, 3 * C_);
    let inp = up(be, &randn(&mut r, n * c, 1.0));
    let w = up(be, &randn(&mut r, c, 0.2).iter().map(|x| 1.0 + x).collect::<Vec<_>>());
    let (out, rstd) = (be.alloc(n * c), be.alloc(n));
    be.rmsnorm_forward(B::whole(&out), B::whole(&rstd), B::whole(&inp), B::whole(&w), n, c, 1e-6);
    let dout = up(be, &randn(&mut r, n * c, 1.0));
    let (dinp, dw) = (up(be, &randn(&mut r, n * c, 1.0)), be.alloc(c));
    be.rmsnorm_backward(B::whole(&dinp), B::whole(&dw), B::whole(&dout), B::whole(&inp), B::whole(&w), B::whole(&rstd), n, c);
    // Rotary positions on the q and k heads of fused qkv rows (NH q heads, NH/2 kv heads).
    let (hd, kv) = (C_ / NH_, NH_ / 2);
    let stride = (NH_ + 2 * kv) * hd;
    let qkv = up(be, &randn(&mut r, n * stride, 1.0));
    be.rope(B::whole(&qkv), n, T_, stride, NH_ + kv, hd, 10_000.0, false);
    let rot = down(be, &qkv);
    be.rope(B::whole(&qkv), n, T_, stride, NH_ + kv, hd, 500_000.0, true);
    let (expanded, reduced) = (be.alloc(n * 3 * NH_ * hd), be.alloc(n * stride));
    be.gqa_expand(B::whole(&expanded), B::whole(&qkv), n, NH_, kv, hd);
    be.gqa_reduce(B::whole(&reduced), B::whole(&expanded), n, NH_, kv, hd);
    let g = up(be, &randn(&mut r, n * 2 * f, 2.0));
    let (sw, dsw) = (be.alloc(n * f), be.alloc(n * 2 * f));
    be.swiglu_forward(B::whole(&sw), B::whole(&g), n, f);
    let dsout = up(be, &randn(&mut r, n * f, 1.0));
    be.swiglu_backward(B::whole(&dsw), B::whole(&g), B::whole(&dsout), n, f);
    vec![
        ("rmsnorm out", down(be, &out)),
        ("rmsnorm rstd", down(be, &rstd)),
        ("rmsnorm dinp", down(be, &dinp)),
        ("rmsnorm dw", down(be, &dw)),
        ("rope", rot),
        ("rope inverse", down(be, &qkv)),
        ("gqa expand", down(be, &expanded)),
        ("gqa reduce", down(be, &reduced)),
        ("swiglu out", down(be, &sw)),
        ("swiglu dinp", down(be, &dsw)),
    ]
});

parity!(llama_block_forward_backward_match_cpu, 1e-4, |be: B| {
    // qwen3: the llama block with QK-norm, so every op of both kinds runs.
    let mut r = Rng::new(32);
    let dims = taproot::model::Dims::llama(67, T_, C_, NH_, NH_ / 2, 2 * C_).with_arch(taproot::model::Arch::Qwen3);
    block_outputs(be, &dims, taproot::model::moe::Mlp::Dense, &mut r)
});

parity!(layernorm_forward_backward_match_cpu, TOL, |be: B| {
    let mut r = Rng::new(3);
    let (n, c) = (B_ * T_, C_);
    let inp = up(be, &randn(&mut r, n * c, 1.0));
    let w = up(be, &randn(&mut r, c, 0.2).iter().map(|x| 1.0 + x).collect::<Vec<_>>());
    let b = up(be, &randn(&mut r, c, 0.2));
    let (out, mean, rstd) = (be.alloc(n * c), be.alloc(n), be.alloc(n));
    be.layernorm_forward(B::whole(&out), B::whole(&mean), B::whole(&rstd), B::whole(&inp), B::whole(&w), B::whole(&b), n, c);
    let dout = up(be, &randn(&mut r, n * c, 1.0));
    let (dinp, dw, db) = (up(be, &randn(&mut r, n * c, 1.0)), be.alloc(c), be.alloc(c));
    be.layernorm_backward(
        B::whole(&dinp),
        B::whole(&dw),
        B::whole(&db),
        B::whole(&dout),
        B::whole(&inp),
        B::whole(&w),
        B::whole(&mean),
        B::whole(&rstd),
        n,
        c,
    );
    vec![
        ("out", down(be, &out)),
        ("mean", down(be, &mean)),
        ("rstd", down(be, &rstd)),
        ("dinp", down(be, &dinp)),
        ("dw", down(be, &dw)),
        ("db", down(be, &db)),
    ]
});

parity!(attention_forward_backward_match_cpu, TOL, |be: B| {
    let mut r = Rng::new(4);
    let (b, t, c, nh) = (B_, T_, C_, NH_);
    let qkv = up(be, &randn(&mut r, b * t * 3 * c, 1.0));
    let (out, att) = (be.alloc(b * t * c), be.alloc(b * nh * t * t));
    be.attention_forward(B::whole(&out), B::whole(&att), B::whole(&qkv), b, t, c, nh);
    let dout = up(be, &randn(&mut r, b * t * c, 1.0));
    let (dqkv, datt) = (be.alloc(b * t * 3 * c), be.alloc(b * nh * t * t));
    be.attention_backward(B::whole(&dqkv), B::whole(&datt), B::whole(&dout), B::whole(&qkv), B::whole(&out), B::whole(&att), b, t, c, nh);
    vec![("out", down(be, &out)), ("att", down(be, &att)), ("dqkv", down(be, &dqkv))]
});

parity!(gelu_residual_and_reductions_match_cpu, TOL, |be: B| {
    let mut r = Rng::new(5);
    let n = 10_000;
    let (x, y) = (up(be, &randn(&mut r, n, 2.0)), up(be, &randn(&mut r, n, 1.0)));
    let (g, dg, s) = (be.alloc(n), be.alloc(n), be.alloc(n));
    be.gelu_forward(B::whole(&g), B::whole(&x));
    be.gelu_backward(B::whole(&dg), B::whole(&x), B::whole(&y));
    be.add(B::whole(&s), B::whole(&x), B::whole(&y));
    be.axpby(B::whole(&s), 0.5, -2.0, B::whole(&y));
    let ss = be.alloc(1);
    be.sumsq(B::whole(&ss), B::whole(&s));
    be.scale_by_rnorm(B::whole(&s), B::whole(&ss), 1e-7);
    vec![("gelu", down(be, &g)), ("dgelu", down(be, &dg)), ("sumsq", down(be, &ss)), ("normalised", down(be, &s))]
});

parity!(embedding_and_crossentropy_match_cpu, TOL, |be: B| {
    let mut r = Rng::new(6);
    let (b, t, c, v, vp) = (B_, T_, C_, 300, 384);
    let tok: Vec<u32> = (0..b * t).map(|_| r.below(v as u64) as u32).collect();
    let tg: Vec<u32> = (0..b * t).map(|_| r.below(v as u64) as u32).collect();
    let (idb, tgb) = (ids(be, &tok), ids(be, &tg));
    let (wte, wpe) = (up(be, &randn(&mut r, vp * c, 1.0)), up(be, &randn(&mut r, t * c, 1.0)));
    let x = be.alloc(b * t * c);
    be.encoder_forward(B::whole(&x), &idb, B::whole(&wte), Some(B::whole(&wpe)), b, t, c);
    let dout = up(be, &randn(&mut r, b * t * c, 1.0));
    let (dwte, dwpe) = (be.alloc(vp * c), be.alloc(t * c));
    be.encoder_backward(B::whole(&dwte), Some(B::whole(&dwpe)), B::whole(&dout), &idb, b, t, c);
    let logits = up(be, &randn(&mut r, b * t * vp, 3.0));
    let losses = be.alloc(b * t);
    be.crossentropy_forward_backward(B::whole(&logits), B::whole(&losses), &tgb, 1.0 / (b * t) as f32, b * t, v, vp);
    vec![
        ("x", down(be, &x)),
        ("dwte", down(be, &dwte)),
        ("dwpe", down(be, &dwpe)),
        ("losses", down(be, &losses)),
        ("dlogits", down(be, &logits)),
    ]
});

parity!(optimizer_kernels_match_cpu, TOL, |be: B| {
    use taproot::optim::muon;
    let mut r = Rng::new(7);
    let n = 96 * 64;
    let (p, g, m, v) = (
        up(be, &randn(&mut r, n, 1.0)),
        up(be, &randn(&mut r, n, 1.0)),
        up(be, &randn(&mut r, n, 0.1)),
        up(be, &randn(&mut r, n, 0.1).iter().map(|x| x * x).collect::<Vec<_>>()),
    );
    be.adamw_update(B::whole(&p), B::whole(&g), B::whole(&m), B::whole(&v), 1e-2, 0.9, 0.95, 1e-8, 0.1, 3);
    let u = be.alloc(n);
    be.momentum_update(B::whole(&u), B::whole(&m), B::whole(&g), 0.95, true);
    let ss = be.alloc(1);
    be.sumsq(B::whole(&ss), B::whole(&u));
    be.nsgd_apply(B::whole(&p), B::whole(&u), B::whole(&ss), 0.02, 0.01, 1e-8);
    // Newton–Schulz (tall 96x64 and wide 64x96) through backend products
    let mut outs = vec![("adamw+nsgd p", down(be, &p)), ("m", down(be, &m)), ("v", down(be, &v))];
    for (rows, cols, name) in [(96, 64, "NS tall"), (64, 96, "NS wide")] {
        let x = up(be, &randn(&mut r, rows * cols, 1.0));
        be.sumsq(B::whole(&ss), B::whole(&x));
        be.scale_by_rnorm(B::whole(&x), B::whole(&ss), 1e-7);
        let (x2, a, bm) = (be.alloc(n), be.alloc(96 * 96), be.alloc(96 * 96));
        let k = rows.min(cols);
        let in_x2 = muon::newton_schulz(
            be,
            B::whole(&x),
            B::whole(&x2),
            View::new(&a, 0, k * k),
            View::new(&bm, 0, k * k),
            rows,
            cols,
            5,
            [3.4445, -4.7750, 2.0315],
        );
        outs.push((name, down(be, if in_x2 { &x2 } else { &x })));
    }
    be.apply_update(B::whole(&p), B::whole(&u), 0.02, 1.5, 0.01);
    outs.push(("apply_update p", down(be, &p)));
    outs
});

// ------------------------------------------------------------------------------------------
// whole model, runtime, streams

/// 20 steps with a copying growth at step 10, Muon-NSGD: every step's training loss on the GPU
/// within 1e-3 relative of the CPU trainer's (f32 rounding compounds over steps; Newton–Schulz
/// amplifies it a little), and the validation losses too.
#[test]
fn training_with_growth_on_gpu_matches_the_cpu_trainer() {
    let Some(g) = gpu() else { return };
    use taproot::train::{sequential::Sequential, RunOptions};
    let dir = std::env::temp_dir().join(format!("taproot-cuda-train-{}", std::process::id()));
    let data = dataset(&dir);
    let cfg = tiny_cfg(&dir, "gpu-seq").build();
    let q = RunOptions { quiet: true, ..Default::default() };
    let cpu = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap().run(&q).unwrap();
    let gpu = Sequential::new(g, &cfg, &data).unwrap().run(&q).unwrap();
    for (a, b) in cpu.steps.iter().zip(&gpu.steps) {
        let r = ((a.train_loss - b.train_loss) / a.train_loss).abs();
        println!("step {:2} depth {} cpu {:.6} gpu {:.6} rel {r:.1e}", a.step, a.depth, a.train_loss, b.train_loss);
        assert_eq!(a.depth, b.depth);
        assert!(r < 1e-3, "step {}: cpu {} gpu {}", a.step, a.train_loss, b.train_loss);
    }
    for (a, b) in cpu.evals.iter().zip(&gpu.evals) {
        assert!(((a.val_loss - b.val_loss) / a.val_loss).abs() < 1e-3);
    }
    assert_eq!(cpu.growth, gpu.growth);
}

/// The actor runtime on the GPU (one stream per stage, events at hand-offs) against the
/// sequential trainer on the same GPU.
#[test]
fn actor_runtime_on_gpu_matches_sequential_on_gpu() {
    let Some(g) = gpu() else { return };
    use taproot::train::{sequential::Sequential, RunOptions};
    let dir = std::env::temp_dir().join(format!("taproot-cuda-rt-{}", std::process::id()));
    let data = dataset(&dir);
    let cfg = tiny_cfg(&dir, "gpu-rt").devices(&["cuda:0"]).build();
    let seq = Sequential::new(g, &cfg, &data).unwrap().run(&RunOptions { quiet: true, ..Default::default() }).unwrap();
    let rt = taproot::runtime::train::<CudaBackend>(&cfg, data, taproot::runtime::RunOptions { quiet: true, ..Default::default() }, false)
        .unwrap();
    assert_eq!(rt.steps.len(), 20);
    for (a, b) in seq.steps.iter().zip(&rt.steps) {
        assert_eq!(a.depth, b.depth);
        assert!(((a.train_loss - b.train_loss) / a.train_loss).abs() < 1e-4, "step {}: {} vs {}", a.step, a.train_loss, b.train_loss);
    }
}

/// Stream A writes a buffer after a long chain of products; stream B reads it. With B waiting
/// on A's event the read sees the final value; without the wait it sees stale memory — the
/// event is what orders the hand-off, not luck.
#[test]
fn two_stream_hand_off_needs_the_event_wait() {
    let Some(a) = gpu() else { return };
    let b = a.fork().unwrap();
    let n = 2048;
    let run = |wait: bool| -> f32 {
        let (x, y, z) = (a.alloc(n * n), a.alloc(n * n), a.alloc(n * n));
        a.fill(CudaBackend::whole(&x), 0.5);
        a.fill(CudaBackend::whole(&y), 0.0);
        let flag = a.alloc(1);
        a.fill(CudaBackend::whole(&flag), 0.0);
        a.synchronize();
        // ~tens of milliseconds of work on stream A, then the flag it hands over
        for _ in 0..40 {
            a.gemm(CudaBackend::whole(&z), CudaBackend::whole(&x), Trans::N, CudaBackend::whole(&x), Trans::N, n, n, n, 1.0, 0.0);
        }
        a.fill(CudaBackend::whole(&flag), 1.0);
        let ev = a.record();
        let out = b.alloc(1);
        if wait {
            b.wait(&ev);
        }
        b.copy(CudaBackend::whole(&out), CudaBackend::whole(&flag));
        let mut h = [0.0f32];
        b.download(CudaBackend::whole(&out), &mut h);
        a.synchronize();
        let _ = y;
        h[0]
    };
    let with = run(true);
    let without = run(false);
    println!("hand-off with the event wait read {with}; without it read {without}");
    assert_eq!(with, 1.0, "with the event wait the reader must see the writer's value");
    assert_eq!(without, 0.0, "without the wait the reader ran ahead of the writer (the wait is what orders the hand-off)");
}

// several GPUs, uploads, checkpoints, the daemon

/// `n` CUDA devices, or None after printing why the test skips.
fn gpus(n: usize) -> Option<Vec<CudaBackend>> {
    match cuda::device_count() {
        Ok(have) if have >= n => Some(
            (0..n).map(|i| CudaBackend::open(&format!("cuda:{i}")).expect("a CUDA device is present but could not be opened")).collect(),
        ),
        Ok(have) => {
            println!("SKIP: needs {n} CUDA devices, this machine has {have}");
            None
        }
        Err(e) => {
            println!("SKIP: {e:#}");
            None
        }
    }
}

/// A peer copy from cuda:1 into cuda:0, ordered by the writer's event: the receiver sees exactly
/// what the writer wrote last, after a long chain of work on the writer's stream.
#[test]
fn peer_copy_between_two_gpus_is_exact_and_ordered_by_the_event() {
    let Some(g) = gpus(2) else { return };
    let (a, b) = (&g[0], &g[1]);
    let n = 1 << 20;
    let mut rng = Rng::new(5);
    let host = randn(&mut rng, n, 1.0);
    let src = b.alloc(n);
    b.upload(CudaBackend::whole(&src), &host);
    // work on cuda:1 that ends by rewriting src: src = 2 * src
    let big = b.alloc(2048 * 2048);
    b.fill(CudaBackend::whole(&big), 0.25);
    let out = b.alloc(2048 * 2048);
    for _ in 0..20 {
        b.gemm(
            CudaBackend::whole(&out),
            CudaBackend::whole(&big),
            Trans::N,
            CudaBackend::whole(&big),
            Trans::N,
            2048,
            2048,
            2048,
            1.0,
            0.0,
        );
    }
    b.axpby(CudaBackend::whole(&src), 0.0, 2.0, CudaBackend::whole(&src));
    let ready = b.record();
    assert!(!a.is_local(&src) && b.is_local(&src));
    let dst = a.alloc(n);
    a.wait(&ready);
    a.copy_peer(CudaBackend::whole(&dst), CudaBackend::whole(&src));
    let got = down(a, &dst);
    let want: Vec<f32> = host.iter().map(|x| 2.0 * x).collect();
    assert_eq!(got, want, "the peer copy differs from what cuda:1 wrote");
    b.synchronize();
}

/// The actor runtime with its stages on two GPUs (ends and the lower layers on cuda:0, the
/// upper ones on cuda:1, a growth in between) against the same run on one GPU: the same losses
/// (1e-4 relative), and activations and gradients really crossed (peer copies counted).
#[test]
fn pipeline_across_two_gpus_matches_one_gpu() {
    let Some(_g) = gpus(2) else { return };
    use std::sync::{Arc, Mutex};
    use taproot::runtime::events::Event;
    let dir = std::env::temp_dir().join(format!("taproot-cuda-2gpu-{}", std::process::id()));
    let data = dataset(&dir);
    let q = taproot::runtime::RunOptions { quiet: true, ..Default::default() };
    let one_cfg = tiny_cfg(&dir, "one-gpu").devices(&["cuda:0"]).build();
    let one = taproot::runtime::train::<CudaBackend>(&one_cfg, dataset(&dir), q.clone(), false).unwrap();
    let cfg = tiny_cfg(&dir, "two-gpus").devices(&["cuda:0", "cuda:1"]).build();
    let copied = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let c = copied.clone();
    let observer: taproot::runtime::events::Observer = Arc::new(move |e: &Event| {
        if let Event::Buffers { device, peer_bytes_in, .. } = e {
            c.lock().unwrap().insert(device.clone(), *peer_bytes_in);
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let two = rt.block_on(async { taproot::runtime::start::<CudaBackend>(&cfg, data, q, observer).await.unwrap().wait().await.unwrap() });
    for (a, b) in one.steps.iter().zip(&two.steps) {
        let r = ((a.train_loss - b.train_loss) / a.train_loss).abs();
        println!("step {:2} depth {} one gpu {:.6} two gpus {:.6} rel {r:.1e}", a.step, a.depth, a.train_loss, b.train_loss);
        assert_eq!(a.depth, b.depth);
        assert!(r < 1e-4, "step {}: {} vs {}", a.step, a.train_loss, b.train_loss);
    }
    let copied = copied.lock().unwrap().clone();
    println!("bytes copied in per device: {copied:?}");
    assert!(copied.get("cuda:0").copied().unwrap_or(0) > 0 && copied.get("cuda:1").copied().unwrap_or(0) > 0, "no peer copies: {copied:?}");
}

/// Token ids go up through a ring of pinned staging buffers without waiting for the stream.
/// Thirty uploads into ONE device buffer (more than the ring has slots), each read by an
/// embedding lookup queued right after it: every lookup must see its own ids, so neither a
/// reused staging slot nor the device buffer may be overwritten before the reads before it.
#[test]
fn pinned_id_uploads_stay_in_order_across_the_staging_ring() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::default();
    let (b, t, c, vp) = (4, 64, 32, 128);
    let mut rng = Rng::new(9);
    let wte_h = randn(&mut rng, vp * c, 1.0);
    let wpe_h = randn(&mut rng, t * c, 1.0);
    let (wte, wpe) = (up(&g, &wte_h), up(&g, &wpe_h));
    let (cwte, cwpe) = (up(&cpu, &wte_h), up(&cpu, &wpe_h));
    let ids_dev = g.alloc_ids(b * t);
    let mut outs = Vec::new();
    let mut wants = Vec::new();
    for _ in 0..30 {
        let ids_h: Vec<u32> = (0..b * t).map(|_| rng.below(vp as u64) as u32).collect();
        g.upload_ids(&ids_dev, &ids_h);
        let out = g.alloc(b * t * c);
        g.encoder_forward(CudaBackend::whole(&out), &ids_dev, CudaBackend::whole(&wte), Some(CudaBackend::whole(&wpe)), b, t, c);
        outs.push(out);
        let cout = cpu.alloc(b * t * c);
        cpu.encoder_forward(
            CpuBackend::whole(&cout),
            &ids(&cpu, &ids_h),
            CpuBackend::whole(&cwte),
            Some(CpuBackend::whole(&cwpe)),
            b,
            t,
            c,
        );
        wants.push(down(&cpu, &cout));
    }
    for (i, (o, w)) in outs.iter().zip(&wants).enumerate() {
        assert_eq!(&down(&g, o), w, "lookup {i} did not see its own ids");
    }
}

/// Checkpoints are host data: a run checkpointed on the GPU resumes on the CPU, and continues
/// like the run that stayed on the GPU (1e-3 relative).
#[test]
fn a_gpu_checkpoint_resumes_on_the_cpu() {
    let Some(_g) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("taproot-cuda-ck-{}", std::process::id()));
    let q = taproot::runtime::RunOptions { quiet: true, ..Default::default() };
    let gpu_cfg = tiny_cfg(&dir, "portable").checkpoint_every(10).devices(&["cuda:0"]).build();
    let full = taproot::runtime::train::<CudaBackend>(&gpu_cfg, dataset(&dir), q.clone(), false).unwrap();
    // Same run name: the CPU run finds the GPU run's checkpoints. Keep only the one of step 10.
    let ck_dir = gpu_cfg.checkpoint_dir();
    for (step, path) in taproot::checkpoint::list(&ck_dir).unwrap() {
        if step != 10 {
            std::fs::remove_file(path).unwrap();
        }
    }
    let cpu_cfg = tiny_cfg(&dir, "portable").checkpoint_every(10).devices(&["cpu:0"]).build();
    let resumed =
        taproot::runtime::train::<CpuBackend>(&cpu_cfg, dataset(&dir), taproot::runtime::RunOptions { resume: true, ..q }, false).unwrap();
    assert_eq!(resumed.steps.first().map(|s| s.step), Some(11), "the CPU run did not resume at step 11");
    for b in &resumed.steps {
        let a = full.steps.iter().find(|a| a.step == b.step).unwrap();
        let r = ((a.train_loss - b.train_loss) / a.train_loss).abs();
        println!("step {:2} depth {} gpu {:.6} resumed on cpu {:.6} rel {r:.1e}", a.step, a.depth, a.train_loss, b.train_loss);
        assert_eq!(a.depth, b.depth);
        assert!(r < 1e-3, "step {}: {} vs {}", a.step, a.train_loss, b.train_loss);
    }
}

/// The daemon runs a CUDA config: it trains, serves /metrics with the GPU's memory in it, and
/// exits 0 after its linger.
#[test]
fn the_daemon_trains_on_the_gpu_and_reports_its_memory() {
    let Some(_g) = gpu() else { return };
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("taproot-cuda-daemon-{}", std::process::id()));
    let _ = dataset(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = tiny_cfg(&dir, "daemon-gpu")
        .devices(&["cuda:0"])
        .extra(&format!("[daemon]\nlisten = \"127.0.0.1:{port}\"\nlinger_s = 5\n"))
        .build();
    let path = dir.join("daemon-gpu.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let opts = taproot::daemon::DaemonOptions {
        config: path,
        sets: vec![],
        listen: None,
        log_file: Some(dir.join("daemon-gpu.log")),
        allow_config_change: vec![],
    };
    let daemon = std::thread::spawn(move || taproot::daemon::run(opts));
    let scrape = || -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(body)
    };
    let t0 = std::time::Instant::now();
    let mut seen = None;
    while t0.elapsed() < std::time::Duration::from_secs(60) {
        if let Some(b) =
            scrape().filter(|b| b.contains("taproot_device_memory_used_bytes{device=\"cuda:0\"}") && b.contains("taproot_step 20"))
        {
            seen = Some(b);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let code = daemon.join().unwrap().unwrap();
    let body = seen.expect("the daemon never showed 20 steps and the GPU's memory on /metrics");
    let line = body.lines().find(|l| l.starts_with("taproot_device_memory_used_bytes{device=\"cuda:0\"}")).unwrap();
    println!("{line}");
    let bytes: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(bytes > 0.0, "{line}");
    assert_eq!(code, 0, "daemon exit code");
}

/// Every growth operator (random, copying, zero, copying_zero) under every optimizer-state
/// policy builds, on the GPU, exactly the block it builds on the CPU: the same parameters,
/// optimizer moments and step counters, bit for bit (inits are computed on the host, so the
/// definitions checked against docs/METHOD.md in tests/growth.rs hold on the GPU too).
#[test]
fn every_growth_operator_builds_the_same_block_on_gpu_as_on_cpu() {
    let Some(g) = gpu() else { return };
    use taproot::model::growth::{make_block, GrowInit, OptStatePolicy};
    use taproot::model::init::{InitConfig, InitScheme};
    use taproot::model::{Block, Dims};
    use taproot::params::UnitState;
    let cpu = CpuBackend::default();
    let dims = Dims::new(67, 16, 64, 4);
    let init_cfg = InitConfig::new(InitScheme::Gpt2, 4, 7);
    // A source block with trained-looking state: random parameters, moments and step counters.
    let n = Block::<CpuBackend>::layout(&dims).total;
    let specs = Block::<CpuBackend>::layout(&dims).specs.len();
    let mut rng = Rng::new(21);
    let source = UnitState {
        params: randn(&mut rng, n, 0.1),
        m: randn(&mut rng, n, 0.01),
        v: Some(randn(&mut rng, n, 0.01).iter().map(|x| x * x).collect()),
        steps: (0..specs as u64).map(|i| 100 + i).collect(),
    };
    for init in [GrowInit::Random, GrowInit::Copying, GrowInit::Zero, GrowInit::CopyingZero] {
        for policy in [OptStatePolicy::Inherit, OptStatePolicy::Copy, OptStatePolicy::Reset] {
            let on_cpu = make_block(&cpu, &dims, 5, init, Some(&source), policy, &init_cfg, taproot::model::moe::Mlp::Dense)
                .unwrap()
                .w
                .snapshot(&cpu);
            let on_gpu =
                make_block(&g, &dims, 5, init, Some(&source), policy, &init_cfg, taproot::model::moe::Mlp::Dense).unwrap().w.snapshot(&g);
            assert_eq!(on_cpu.params, on_gpu.params, "{init:?}/{policy:?}: parameters differ");
            assert_eq!(on_cpu.m, on_gpu.m, "{init:?}/{policy:?}: first moments differ");
            assert_eq!(on_cpu.v, on_gpu.v, "{init:?}/{policy:?}: second moments differ");
            assert_eq!(on_cpu.steps, on_gpu.steps, "{init:?}/{policy:?}: step counters differ");
        }
    }
}

/// The reduced precisions (`precision.compute`): the GPU's products against the CPU backend's
/// emulation of the same precision, and against fp32.
///
/// - **Same precision on both.** Both round every operand of the linear products the same way
///   (bf16: round to nearest even; TF32: cuBLAS's tensor-core conversion), so those agree to
///   accumulation order: bound 2e-3 for tf32 (cuBLAS's TF32 conversion need not be the CPU's
///   round-to-nearest-even), 1e-4 for bf16. The attention products differ by one more rounding
///   (the GPU reads the probabilities in bf16, the CPU's emulation does not): 1e-2 there.
/// - **Against fp32.** An operand rounded to p mantissa bits carries relative error ≤ 2^-(p+1)
///   (bf16: 3.9e-3, TF32: 4.9e-4); over sums of random-sign terms the product's relative error
///   in norm stays near that: bound 1.5e-2 for bf16, 3e-3 for TF32. And the precision is really
///   in use: a 1024³ product differs from fp32 by more than fp32's own bound (1e-5).
#[test]
fn reduced_precision_products_match_the_cpu_emulation_and_fp32_within_bounds() {
    let Some(_g) = gpu() else { return };
    use taproot::backend::Precision;
    fn products<B: Backend>(be: &B) -> Vec<(&'static str, Vec<f32>)> {
        let mut r = Rng::new(31);
        let (n, c, oc) = (B_ * T_, C_, 3 * C_);
        let (inp, w, dout) = (up(be, &randn(&mut r, n * c, 1.0)), up(be, &randn(&mut r, oc * c, 0.1)), up(be, &randn(&mut r, n * oc, 1.0)));
        let bias = up(be, &randn(&mut r, oc, 0.1));
        let out = be.alloc(n * oc);
        be.matmul_forward(B::whole(&out), B::whole(&inp), B::whole(&w), Some(B::whole(&bias)), n, c, oc);
        let (dinp, dw, db) = (be.alloc(n * c), be.alloc(oc * c), be.alloc(oc));
        be.matmul_backward(
            Some(B::whole(&dinp)),
            B::whole(&dw),
            Some(B::whole(&db)),
            B::whole(&dout),
            B::whole(&inp),
            B::whole(&w),
            n,
            c,
            oc,
        );
        let (b, t, c, nh) = (B_, T_, C_, NH_);
        let qkv = up(be, &randn(&mut r, b * t * 3 * c, 1.0));
        let (aout, att) = (be.alloc(b * t * c), be.alloc(b * nh * t * t));
        be.attention_forward(B::whole(&aout), B::whole(&att), B::whole(&qkv), b, t, c, nh);
        let adout = up(be, &randn(&mut r, b * t * c, 1.0));
        let (dqkv, datt) = (be.alloc(b * t * 3 * c), be.alloc(b * nh * t * t));
        be.attention_backward(
            B::whole(&dqkv),
            B::whole(&datt),
            B::whole(&adout),
            B::whole(&qkv),
            B::whole(&aout),
            B::whole(&att),
            b,
            t,
            c,
            nh,
        );
        let k = 1024;
        let (x, y, z) = (up(be, &randn(&mut r, k * k, 1.0)), up(be, &randn(&mut r, k * k, 1.0)), be.alloc(k * k));
        be.gemm(B::whole(&z), B::whole(&x), Trans::N, B::whole(&y), Trans::N, k, k, k, 1.0, 0.0);
        vec![
            ("out", down(be, &out)),
            ("dinp", down(be, &dinp)),
            ("dw", down(be, &dw)),
            ("db", down(be, &db)),
            ("attn out", down(be, &aout)),
            ("attn dqkv", down(be, &dqkv)),
            ("gemm 1024^3", down(be, &z)),
        ]
    }
    let cpu32 = CpuBackend::default();
    let exact = products(&cpu32);
    for (p, same_lin, same_att, vs_fp32) in [(Precision::Tf32, 2e-3, 1e-2, 3e-3), (Precision::Bf16, 1e-4, 1e-2, 1.5e-2)] {
        let g = CudaBackend::open("cuda:0").unwrap();
        g.set_precision(p).unwrap();
        let cpu = CpuBackend::default();
        cpu.set_precision(p).unwrap();
        let got = products(&g);
        let emulated = products(&cpu);
        for (((name, x), (_, e)), (_, w)) in got.iter().zip(&emulated).zip(&exact) {
            let (r_same, r_fp32) = (rel(x, e), rel(x, w));
            let bound = if name.starts_with("attn") { same_att } else { same_lin };
            println!("{p} {name:<12} vs cpu {p}: {r_same:.2e} (bound {bound:e}); vs fp32: {r_fp32:.2e} (bound {vs_fp32:e})");
            assert!(r_same <= bound, "{p} {name}: {r_same:.3e} from the CPU's {p} emulation > {bound:e}");
            assert!(r_fp32 <= vs_fp32, "{p} {name}: {r_fp32:.3e} from fp32 > {vs_fp32:e}");
        }
        let big = rel(&got.last().unwrap().1, &exact.last().unwrap().1);
        assert!(big > TOL, "a 1024^3 product in {p} is as exact as fp32 ({big:.2e}): {p} is not in use");
    }
}

/// A bf16 training run with growth on the GPU: its losses follow the fp32 run on the GPU (2%
/// per step over 60 steps of a tiny model, the bound `tests/precision.rs` holds on the CPU for
/// the same scheme), they follow the CPU's bf16 emulation (1e-2), and the actor runtime in bf16
/// follows the sequential trainer in bf16 on the GPU (5e-3). Why looser than fp32's 1e-4: the
/// float atomics of a few reductions make two GPU runs differ in the last bit, and a last-bit
/// difference that crosses a bf16 rounding boundary becomes a 2^-8 difference in an operand;
/// on the H200 the two stayed within 3e-4 until the growth step, where the loss jumps and they
/// differed by 1.9e-3.
#[test]
fn bf16_training_with_growth_on_gpu_follows_fp32_and_the_cpu_emulation() {
    let Some(g) = gpu() else { return };
    use taproot::train::{sequential::Sequential, RunOptions};
    let dir = std::env::temp_dir().join(format!("taproot-cuda-bf16-{}", std::process::id()));
    let data = dataset(&dir);
    let q = RunOptions { quiet: true, ..Default::default() };
    let base = |name: &str| {
        TestConfig::new(&dir)
            .name(name)
            .steps(60)
            .seq_len(32)
            .micro_batches(2)
            .channels(64)
            .depth(1)
            .target_depth(3)
            .eval(30, 2)
            .grow_at_step(30, 3)
            .growth_init("copying")
            .devices(&["cuda:0"])
    };
    let fp32_cfg = base("gpu-fp32").build();
    let bf16_cfg = base("gpu-bf16").set("precision.compute", "bf16").build();
    let fp32 = Sequential::new(g, &fp32_cfg, &data).unwrap().run(&q).unwrap();
    let g = CudaBackend::open("cuda:0").unwrap();
    let bf16 = Sequential::new(g, &bf16_cfg, &data).unwrap().run(&q).unwrap();
    let cpu = Sequential::new(CpuBackend::default(), &bf16_cfg, &data).unwrap().run(&q).unwrap();
    let rt = taproot::runtime::train::<CudaBackend>(
        &bf16_cfg,
        dataset(&dir),
        taproot::runtime::RunOptions { quiet: true, ..Default::default() },
        false,
    )
    .unwrap();
    assert_eq!(bf16.growth.len(), 1, "the bf16 run grew");
    for (((a, b), c), r) in fp32.steps.iter().zip(&bf16.steps).zip(&cpu.steps).zip(&rt.steps) {
        let vs32 = ((a.train_loss - b.train_loss) / a.train_loss).abs();
        let vscpu = ((c.train_loss - b.train_loss) / c.train_loss).abs();
        let vsrt = ((r.train_loss - b.train_loss) / b.train_loss).abs();
        println!(
            "step {:2} depth {} fp32 {:.5} bf16 {:.5} cpu-bf16 {:.5} runtime-bf16 {:.5}  (vs fp32 {vs32:.1e}, vs cpu {vscpu:.1e}, vs runtime {vsrt:.1e})",
            a.step, b.depth, a.train_loss, b.train_loss, c.train_loss, r.train_loss
        );
        assert_eq!(a.depth, b.depth);
        assert!(vs32 < 2e-2, "step {}: bf16 {} vs fp32 {}", a.step, b.train_loss, a.train_loss);
        assert!(vscpu < 1e-2, "step {}: gpu bf16 {} vs cpu bf16 {}", a.step, b.train_loss, c.train_loss);
        assert!(vsrt < 5e-3, "step {}: runtime bf16 {} vs sequential bf16 {}", a.step, r.train_loss, b.train_loss);
    }
    let diff = fp32.steps.iter().zip(&bf16.steps).any(|(a, b)| a.train_loss != b.train_loss);
    assert!(diff, "the bf16 run's losses equal the fp32 run's bit for bit: bf16 is not in use");
}

/// Flash attention on the GPU (bf16 tensor cores, `kernels.attention = "flash"`), head sizes 64
/// and 128, T = 200 (four key tiles, the last partial): against the CPU's flash kernel in bf16,
/// which rounds the same operands (q, k, v, dO, P, dS) at the same points — bound 5e-3 (the GPU
/// takes exp2 where the CPU takes exp, and an operand near a bf16 rounding boundary may round
/// the other way) — and its logsumexp within 1e-4; against the materialized attention in bf16 on
/// the GPU within 2e-2 (one more rounding: the probabilities); and every key before a query
/// matters (a causal mask off by one tile would be far outside these bounds).
#[test]
fn flash_attention_on_gpu_matches_the_cpu_flash_kernel() {
    let Some(_g) = gpu() else { return };
    use taproot::backend::{Attention, Precision};
    fn case<B: Backend>(be: &B, hs: usize) -> Vec<(&'static str, Vec<f32>)> {
        let (b, t, nh) = (2, 200, 2);
        let c = hs * nh;
        let mut r = Rng::new(hs as u64);
        let qkv = up(be, &randn(&mut r, b * t * 3 * c, 1.0));
        let (out, att) = (be.alloc(b * t * c), be.alloc(be.attention_state_len(b, t, nh)));
        be.attention_forward(B::whole(&out), B::whole(&att), B::whole(&qkv), b, t, c, nh);
        let dout = up(be, &randn(&mut r, b * t * c, 1.0));
        let (dqkv, datt) = (up(be, &vec![5.0; b * t * 3 * c]), be.alloc(be.attention_scratch_len(b, t, nh)));
        be.attention_backward(
            B::whole(&dqkv),
            B::whole(&datt),
            B::whole(&dout),
            B::whole(&qkv),
            B::whole(&out),
            B::whole(&att),
            b,
            t,
            c,
            nh,
        );
        let lse = if be.attention() == Attention::Flash { down(be, &att) } else { vec![] };
        vec![("out", down(be, &out)), ("dqkv", down(be, &dqkv)), ("lse", lse)]
    }
    let open = |a: Attention| {
        let g = CudaBackend::open("cuda:0").unwrap();
        g.set_precision(Precision::Bf16).unwrap();
        g.set_attention(a).unwrap();
        g
    };
    let cpu = CpuBackend::default();
    cpu.set_precision(Precision::Bf16).unwrap();
    cpu.set_attention(Attention::Flash).unwrap();
    for hs in [64, 128] {
        let want = case(&cpu, hs);
        let got = case(&open(Attention::Flash), hs);
        let mat = case(&open(Attention::Materialized), hs);
        for i in 0..2 {
            let (name, x) = (&got[i].0, &got[i].1);
            let (r_cpu, r_mat) = (rel(x, &want[i].1), rel(x, &mat[i].1));
            println!(
                "flash hs={hs} {name:<5} vs cpu flash bf16 {r_cpu:.2e} (bound 5e-3); vs gpu materialized bf16 {r_mat:.2e} (bound 2e-2)"
            );
            assert!(r_cpu <= 5e-3, "hs={hs} {name}: {r_cpu:.3e} from the CPU flash kernel");
            assert!(r_mat <= 2e-2, "hs={hs} {name}: {r_mat:.3e} from the materialized attention");
        }
        let r_lse = rel(&got[2].1, &want[2].1);
        println!("flash hs={hs} lse   vs cpu flash bf16 {r_lse:.2e} (bound 1e-4)");
        assert!(r_lse <= 1e-4, "hs={hs} lse: {r_lse:.3e}");
    }
    let g = CudaBackend::open("cuda:0").unwrap();
    assert!(g.set_attention(Attention::Flash).is_err(), "flash attention accepted on an fp32 stream");
}

/// A bf16 run with flash attention and growth on the GPU (heads of 64): it follows the same run
/// with the materialized attention (2e-2 per step, both bf16) and the CPU's bf16 flash (2e-2),
/// and the actor runtime with flash follows the sequential trainer (5e-3, as in bf16 above).
#[test]
fn bf16_flash_training_on_gpu_follows_the_materialized_run() {
    let Some(g) = gpu() else { return };
    use taproot::train::{sequential::Sequential, RunOptions};
    let dir = std::env::temp_dir().join(format!("taproot-cuda-flash-{}", std::process::id()));
    let data = dataset(&dir);
    let q = RunOptions { quiet: true, ..Default::default() };
    let base = |name: &str| {
        TestConfig::new(&dir)
            .name(name)
            .steps(40)
            .seq_len(80)
            .micro_batches(2)
            .channels(128)
            .heads(2)
            .depth(1)
            .target_depth(3)
            .eval(20, 2)
            .grow_at_step(20, 3)
            .growth_init("copying")
            .devices(&["cuda:0"])
            .set("precision.compute", "bf16")
    };
    let mat_cfg = base("gpu-bf16-mat").build();
    let flash_cfg = base("gpu-bf16-flash").set("kernels.attention", "flash").build();
    let mat = Sequential::new(g, &mat_cfg, &data).unwrap().run(&q).unwrap();
    let flash = Sequential::new(CudaBackend::open("cuda:0").unwrap(), &flash_cfg, &data).unwrap().run(&q).unwrap();
    let cpu = Sequential::new(CpuBackend::default(), &flash_cfg, &data).unwrap().run(&q).unwrap();
    let rt = taproot::runtime::train::<CudaBackend>(
        &flash_cfg,
        dataset(&dir),
        taproot::runtime::RunOptions { quiet: true, ..Default::default() },
        false,
    )
    .unwrap();
    assert_eq!(flash.growth.len(), 1);
    for (((a, b), c), r) in mat.steps.iter().zip(&flash.steps).zip(&cpu.steps).zip(&rt.steps) {
        let (vm, vc, vr) = (
            ((a.train_loss - b.train_loss) / a.train_loss).abs(),
            ((c.train_loss - b.train_loss) / c.train_loss).abs(),
            ((r.train_loss - b.train_loss) / b.train_loss).abs(),
        );
        println!(
            "step {:2} depth {} materialized {:.5} flash {:.5} cpu-flash {:.5} runtime-flash {:.5} ({vm:.1e}, {vc:.1e}, {vr:.1e})",
            a.step, b.depth, a.train_loss, b.train_loss, c.train_loss, r.train_loss
        );
        assert!(vm < 2e-2 && vc < 2e-2 && vr < 5e-3, "step {}", a.step);
    }
}

/// The linear forward with a bias runs as one cuBLASLt call (the BIAS epilogue) on the GPU: in
/// fp32, TF32 and bf16, at the 124M step's shapes and an odd shape, it really takes that path
/// (cuBLASLt's product count grows; an output view 12 bytes off may fall back), equals the
/// cuBLAS product plus the bias kernel (`TAPROOT_CUBLASLT=0`'s path) to accumulation order
/// (1e-5), and the CPU reference within the precision's bound of the other tests.
#[test]
fn the_linear_forward_with_a_bias_is_one_cublaslt_call_and_matches_cublas_and_the_cpu() {
    let Some(g) = gpu() else { return };
    use taproot::backend::Precision;
    let cpu = CpuBackend::default();
    for (p, to_cpu) in [(Precision::Fp32, 1e-5), (Precision::Tf32, 3e-3), (Precision::Bf16, 1.5e-2)] {
        g.set_precision(p).unwrap();
        for (n, c, oc, off) in [(256, 768, 2304, 0), (256, 768, 3072, 0), (130, 96, 200, 0), (64, 128, 384, 3)] {
            let mut r = Rng::new(7);
            let (x, w, b) = (randn(&mut r, n * c, 1.0), randn(&mut r, oc * c, 0.1), randn(&mut r, oc, 0.1));
            let on_gpu = || {
                let (xb, wb, bb) = (up(&g, &x), up(&g, &w), up(&g, &b));
                let out = g.alloc(off + n * oc);
                g.matmul_forward(
                    View::new(&out, off, n * oc),
                    CudaBackend::whole(&xb),
                    CudaBackend::whole(&wb),
                    Some(CudaBackend::whole(&bb)),
                    n,
                    c,
                    oc,
                );
                down(&g, &out)[off..].to_vec()
            };
            cuda::set_cublaslt(false);
            let plain = on_gpu();
            cuda::set_cublaslt(true);
            let before = cuda::cublaslt_products();
            let lt = on_gpu();
            let took = cuda::cublaslt_products() > before;
            // Aligned views must take cuBLASLt; one 12 bytes off may find no algorithm there and
            // fall back (either way, the result must be right).
            assert!(took || off != 0, "{p} ({n}, {c}, {oc}): the product did not go through cuBLASLt");
            cpu.set_precision(p).unwrap();
            let want = {
                let (xb, wb, bb, out) = (up(&cpu, &x), up(&cpu, &w), up(&cpu, &b), cpu.alloc(n * oc));
                cpu.matmul_forward(
                    CpuBackend::whole(&out),
                    CpuBackend::whole(&xb),
                    CpuBackend::whole(&wb),
                    Some(CpuBackend::whole(&bb)),
                    n,
                    c,
                    oc,
                );
                down(&cpu, &out)
            };
            let (same, cpu_err) = (rel(&lt, &plain), rel(&lt, &want));
            println!("{p} ({n}, {c}, {oc}) offset {off}: through cuBLASLt: {took}; against cuBLAS + bias {same:.2e}, against the CPU {cpu_err:.2e}");
            assert!(same <= 1e-5, "{p} ({n}, {c}, {oc}): cuBLASLt and cuBLAS + bias differ by {same:e}");
            assert!(cpu_err <= to_cpu, "{p} ({n}, {c}, {oc}): cuBLASLt against the CPU: {cpu_err:e}");
        }
    }
    g.set_precision(Precision::Fp32).unwrap();
}

/// The MLP's first product with its GELU (`matmul_forward_gelu`) as one cuBLASLt call (the
/// `GELU_AUX_BIAS` epilogue: GELU's output, and the pre-activation in the aux buffer): on a GPU,
/// in fp32, TF32 and bf16, it takes that path, and both outputs equal the cuBLAS product with
/// the bias and GELU kernels and the CPU within the bounds below.
#[test]
fn the_mlp_product_with_its_gelu_is_one_cublaslt_call_and_matches_the_kernels_and_the_cpu() {
    let Some(g) = gpu() else { return };
    use taproot::backend::Precision;
    let cpu = CpuBackend::default();
    for (p, to_cpu) in [(Precision::Fp32, 1e-5), (Precision::Tf32, 3e-3), (Precision::Bf16, 1.5e-2)] {
        g.set_precision(p).unwrap();
        cpu.set_precision(p).unwrap();
        for (n, c, oc) in [(256, 768, 3072), (130, 96, 200)] {
            let mut r = Rng::new(9);
            let (x, w, b) = (randn(&mut r, n * c, 1.0), randn(&mut r, oc * c, 0.1), randn(&mut r, oc, 0.1));
            fn run<B: Backend>(be: &B, x: &[f32], w: &[f32], b: &[f32], (n, c, oc): (usize, usize, usize)) -> [Vec<f32>; 2] {
                let (xb, wb, bb, out, pre) = (up(be, x), up(be, w), up(be, b), be.alloc(n * oc), be.alloc(n * oc));
                be.matmul_forward_gelu(B::whole(&out), B::whole(&pre), B::whole(&xb), B::whole(&wb), Some(B::whole(&bb)), n, c, oc);
                [down(be, &out), down(be, &pre)]
            }
            cuda::set_cublaslt(false);
            let plain = run(&g, &x, &w, &b, (n, c, oc));
            cuda::set_cublaslt(true);
            let before = cuda::cublaslt_products();
            let lt = run(&g, &x, &w, &b, (n, c, oc));
            assert!(cuda::cublaslt_products() > before, "{p} ({n}, {c}, {oc}): the product with GELU did not go through cuBLASLt");
            let want = run(&cpu, &x, &w, &b, (n, c, oc));
            // The pre-activation is the product with its bias (accumulation order apart: 1e-5);
            // GELU's output allows 1e-3 more, as cuBLASLt may evaluate tanh by the hardware's
            // approximation (relative error about 5e-4) where the kernels call tanhf.
            for (i, name, same_bound) in [(0, "out", 1e-3), (1, "pre", 1e-5)] {
                let (same, cpu_err) = (rel(&lt[i], &plain[i]), rel(&lt[i], &want[i]));
                println!("{p} ({n}, {c}, {oc}) {name}: against the kernels {same:.2e}, against the CPU {cpu_err:.2e}");
                assert!(same <= same_bound, "{p} ({n}, {c}, {oc}) {name}: cuBLASLt and the kernels differ by {same:e}");
                assert!(cpu_err <= to_cpu + same_bound, "{p} ({n}, {c}, {oc}) {name}: cuBLASLt against the CPU: {cpu_err:e}");
            }
        }
    }
    g.set_precision(Precision::Fp32).unwrap();
}
