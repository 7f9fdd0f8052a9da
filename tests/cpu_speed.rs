//! The CPU speed work's machinery, checked for what it must not change: the op profile accounts
//! for a real step's ops, `Backend::within` runs a step on the compute pool with the same result,
//! the AdamW runs (neighbouring tensors in one call) equal one call per tensor bitwise, and the
//! row-blocked norm backward passes give the same bits on 1 and 2 threads.

use taproot::backend::cpu::{profile, CpuBackend};
use taproot::backend::Backend;
use taproot::model::init::{InitConfig, InitScheme};
use taproot::model::{Batch, Dims, Model};
use taproot::optim::{OptimConfig, Optimizer, OptimizerKind, Scratch};
use taproot::params::{Layout, ParamSet};
use taproot::rng::Rng;

mod common;

use common::{buf, host, randn};

type B = CpuBackend;

/// The op profile is process-wide: the tests here take turns, so that no other test's ops land
/// in the profiled step.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn model(be: &B, depth: usize) -> (Model<B>, Batch<B>) {
    let dims = Dims::new(64, 16, 32, 4);
    let m = Model::new(be, dims, depth, &InitConfig::new(InitScheme::Gpt2, depth.max(1), 7));
    let mut rng = Rng::new(3);
    let windows: Vec<u32> = (0..2 * 17).map(|_| rng.below(64) as u32).collect();
    let batch = Batch::from_windows(be, &windows, 2, 16);
    (m, batch)
}

fn adamw() -> Optimizer {
    Optimizer::new(OptimConfig { kind: OptimizerKind::Adamw, weight_decay: Some(0.1), ..OptimConfig::default() })
}

/// One training step; the parameters after it.
fn step(be: &B, m: &mut Model<B>, batch: &Batch<B>) -> Vec<f32> {
    let (opt, mut sc) = (adamw(), Scratch::default());
    m.forward_backward(be, batch, 1.0 / 32.0);
    m.finish_grads(be);
    opt.step(be, &mut m.embed.w, &mut sc, 1e-3);
    for blk in m.blocks.iter_mut() {
        opt.step(be, &mut blk.w, &mut sc, 1e-3);
    }
    opt.step(be, &mut m.head.w, &mut sc, 1e-3);
    m.zero_grad(be);
    let mut all = m.embed.w.params_to_host(be);
    for blk in &m.blocks {
        all.extend(blk.w.params_to_host(be));
    }
    all
}

#[test]
fn op_profile_counts_a_steps_ops_and_its_sum_fits_in_the_step() {
    let _turn = turn();
    let be = B::default();
    let (mut m, batch) = model(&be, 2);
    step(&be, &mut m, &batch); // warm
    let t0 = std::time::Instant::now();
    profile::start();
    step(&be, &mut m, &batch);
    let rows = profile::stop();
    let wall = t0.elapsed().as_secs_f64();
    let calls = |prefix: &str| rows.iter().filter(|r| r.op.starts_with(prefix)).map(|r| r.calls).sum::<u64>();
    // GPT-2 blocks: 4 products each, plus the head's; one attention and 2 LayerNorms per block
    // (the second fused with the residual add before it) plus the final one.
    assert_eq!(calls("matmul_forward"), 4 * 2 + 1, "{rows:?}");
    assert_eq!(calls("matmul_backward"), 4 * 2 + 1, "{rows:?}");
    assert_eq!(calls("attention_forward"), 2);
    assert_eq!(calls("layernorm_forward"), 2 + 1);
    assert_eq!(calls("residual_layernorm_forward"), 2);
    assert!(rows.iter().all(|r| r.op != "add"), "the residual adds inside a block are fused: {rows:?}");
    assert!(rows.iter().any(|r| r.op == "matmul_forward 32->128"), "products are named by shape: {rows:?}");
    let sum: f64 = rows.iter().map(|r| r.secs).sum();
    assert!(sum > 0.0 && sum <= wall, "the ops took {sum} s of a {wall} s step");
    // Off again: nothing more is recorded.
    step(&be, &mut m, &batch);
    profile::start();
    let empty = profile::stop();
    assert!(empty.is_empty(), "{empty:?}");
}

#[test]
fn a_step_within_the_pool_equals_one_outside_it() {
    let _turn = turn();
    let be = B::default();
    let (mut a, batch_a) = model(&be, 2);
    let (mut b, batch_b) = model(&be, 2);
    let outside = step(&be, &mut a, &batch_a);
    assert!(rayon::current_thread_index().is_none(), "the test thread is not a pool thread");
    let (inside, on_pool) = be.within(|| (step(&be, &mut b, &batch_b), rayon::current_thread_index().is_some()));
    assert!(on_pool, "within ran the closure off the compute pool");
    assert_eq!(outside, inside, "a step on the pool changed the parameters");
    // A panic inside comes back out to the caller.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| be.within(|| panic!("inside"))));
    assert!(caught.is_err());
}

#[test]
fn adamw_runs_equal_one_update_per_tensor() {
    let _turn = turn();
    let be = B::default();
    // Matrices (decayed) and vectors (not) alternate, so the runs break where the decay changes.
    let layout = Layout::new(&[("a", vec![4, 3]), ("b", vec![3]), ("c", vec![5]), ("d", vec![2, 5]), ("e", vec![7])]);
    let mut rng = Rng::new(11);
    let p0 = randn(&mut rng, layout.total, 1.0);
    let opt = adamw();
    let mut set = ParamSet::new(&be, layout.clone());
    be.upload(B::whole(&set.params), &p0);
    // The reference: one adamw_update per tensor, with its own decay and step.
    let (pr, mr, vr) = (buf(&be, &p0), buf(&be, &vec![0.0; layout.total]), buf(&be, &vec![0.0; layout.total]));
    for t in 1..=3u64 {
        let g = randn(&mut rng, layout.total, 1.0);
        be.upload(B::whole(&set.grads), &g);
        opt.step(&be, &mut set, &mut Scratch::default(), 1e-2);
        let gb = buf(&be, &g);
        for spec in &layout.specs {
            let (o, n) = (spec.offset, spec.numel());
            let v = |x| taproot::backend::View::new(x, o, n);
            let wd = if spec.is_matrix() { 0.1 } else { 0.0 };
            be.adamw_update(v(&pr), v(&gb), v(&mr), v(&vr), 1e-2, opt.cfg.beta1, opt.cfg.beta2, opt.cfg.eps, wd, t);
        }
    }
    assert_eq!(set.params_to_host(&be), host(&be, &pr));
    assert_eq!(host(&be, &set.state.m), host(&be, &mr));
    assert_eq!(host(&be, set.state.v.as_ref().expect("AdamW state")), host(&be, &vr));
}

#[test]
fn norm_backward_passes_give_the_same_bits_on_one_and_two_threads() {
    let _turn = turn();
    let (n, c) = (301, 40); // rows that do not fill the last block
    let mut rng = Rng::new(5);
    let (x, w, bias, d) = (randn(&mut rng, n * c, 1.0), randn(&mut rng, c, 1.0), randn(&mut rng, c, 1.0), randn(&mut rng, n * c, 1.0));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
        pool.install(|| {
            let be = B::default();
            let (xb, wb, bb, db) = (buf(&be, &x), buf(&be, &w), buf(&be, &bias), buf(&be, &d));
            let (out, mean, rstd) = (be.alloc(n * c), be.alloc(n), be.alloc(n));
            be.layernorm_forward(B::whole(&out), B::whole(&mean), B::whole(&rstd), B::whole(&xb), B::whole(&wb), B::whole(&bb), n, c);
            let (dx, dw, dbias) = (be.alloc(n * c), be.alloc(c), be.alloc(c));
            be.layernorm_backward(
                B::whole(&dx),
                B::whole(&dw),
                B::whole(&dbias),
                B::whole(&db),
                B::whole(&xb),
                B::whole(&wb),
                B::whole(&mean),
                B::whole(&rstd),
                n,
                c,
            );
            let (rdx, rdw) = (be.alloc(n * c), be.alloc(c));
            be.rmsnorm_forward(B::whole(&out), B::whole(&rstd), B::whole(&xb), B::whole(&wb), n, c, 1e-6);
            be.rmsnorm_backward(B::whole(&rdx), B::whole(&rdw), B::whole(&db), B::whole(&xb), B::whole(&wb), B::whole(&rstd), n, c);
            [host(&be, &dx), host(&be, &dw), host(&be, &dbias), host(&be, &rdx), host(&be, &rdw)]
        })
    };
    assert_eq!(run(1), run(2));
}

#[test]
fn grouped_expert_products_equal_one_product_per_segment() {
    use taproot::backend::{Segment, View};
    let _turn = turn();
    let be = B::default();
    let (c, oc, rows) = (12, 20, [5usize, 0, 9, 1]);
    let n: usize = rows.iter().sum();
    let mut rng = Rng::new(9);
    let (x, dy) = (buf(&be, &randn(&mut rng, n * c, 1.0)), buf(&be, &randn(&mut rng, n * oc, 1.0)));
    let ws: Vec<_> = rows.iter().map(|_| buf(&be, &randn(&mut rng, oc * c, 1.0))).collect();
    let run = |grouped: bool| {
        let (y, dx) = (be.alloc(n * oc), be.alloc(n * c));
        let dws: Vec<_> = rows.iter().map(|_| buf(&be, &vec![0.5; oc * c])).collect();
        let mut off = 0;
        let (mut segs, mut back, mut dinp, mut dw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, &r) in rows.iter().enumerate().filter(|(_, &r)| r > 0) {
            let w = B::whole(&ws[i]);
            segs.push(Segment { out: View::new(&y, off * oc, r * oc), inp: View::new(&x, off * c, r * c), w, rows: r });
            back.push(Segment { out: View::new(&dy, off * oc, r * oc), inp: View::new(&x, off * c, r * c), w, rows: r });
            dinp.push(View::new(&dx, off * c, r * c));
            dw.push(B::whole(&dws[i]));
            off += r;
        }
        if grouped {
            be.matmul_forward_segments(&segs, c, oc);
            be.matmul_backward_segments(&back, &dinp, &dw, c, oc);
        } else {
            for ((s, b), (di, g)) in segs.iter().zip(&back).zip(dinp.iter().zip(&dw)) {
                be.matmul_forward(s.out, s.inp, s.w, None, s.rows, c, oc);
                be.matmul_backward(Some(*di), *g, None, b.out, b.inp, b.w, b.rows, c, oc);
            }
        }
        let mut all = host(&be, &y);
        all.extend(host(&be, &dx));
        dws.iter().for_each(|d| all.extend(host(&be, d)));
        all
    };
    let (grouped, each) = (run(true), run(false));
    for (i, (a, b)) in grouped.iter().zip(&each).enumerate() {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "element {i}: grouped {a}, one by one {b}");
    }
}

/// The MLP's fused product + GELU (forward) and GELU derivative + product (backward) against the
/// two ops in turn, on shapes whose blocks are ragged (rows past one block of 256, columns past
/// one block of 512, weight-gradient columns past one block of 128); and the same bits on 1 and
/// 2 threads.
#[test]
fn fused_mlp_products_equal_the_ops_in_turn_and_ignore_the_thread_count() {
    let _turn = turn();
    let (n, c, h) = (300, 24, 530); // rows, model width, hidden width
    let mut rng = Rng::new(11);
    let x = randn(&mut rng, n * c, 1.0);
    let (w1, b1) = (randn(&mut rng, h * c, 0.3), randn(&mut rng, h, 0.3));
    let (w2, dy) = (randn(&mut rng, c * h, 0.3), randn(&mut rng, n * c, 1.0));
    let run = |fused: bool, threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
        pool.install(|| {
            let be = B::default();
            let (xb, w1b, b1b, w2b, dyb) = (buf(&be, &x), buf(&be, &w1), buf(&be, &b1), buf(&be, &w2), buf(&be, &dy));
            let (pre, act, dpre, dact) = (be.alloc(n * h), be.alloc(n * h), be.alloc(n * h), be.alloc(n * h));
            let (dw2, db2) = (buf(&be, &vec![0.25; c * h]), buf(&be, &vec![0.5; c]));
            let w = B::whole;
            if fused {
                be.matmul_forward_gelu(w(&act), w(&pre), w(&xb), w(&w1b), Some(w(&b1b)), n, c, h);
                be.matmul_backward_gelu(w(&dpre), w(&dact), w(&dw2), Some(w(&db2)), w(&dyb), w(&act), w(&w2b), w(&pre), n, h, c);
            } else {
                be.matmul_forward(w(&pre), w(&xb), w(&w1b), Some(w(&b1b)), n, c, h);
                be.gelu_forward(w(&act), w(&pre));
                be.matmul_backward(Some(w(&dact)), w(&dw2), Some(w(&db2)), w(&dyb), w(&act), w(&w2b), n, h, c);
                be.gelu_backward(w(&dpre), w(&pre), w(&dact));
            }
            [host(&be, &pre), host(&be, &act), host(&be, &dpre), host(&be, &dw2), host(&be, &db2)]
        })
    };
    let (fused, in_turn) = (run(true, 2), run(false, 2));
    for (k, (f, t)) in fused.iter().zip(&in_turn).enumerate() {
        assert_eq!(f.len(), t.len());
        for (i, (a, b)) in f.iter().zip(t).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "output {k} element {i}: fused {a}, in turn {b}");
        }
    }
    assert_eq!(fused, run(true, 1), "the fused ops' bits depend on the thread count");
}

/// A backward product of many rows runs as two halves (both products each), the second half's
/// weight gradient added after: against the plain products through `Backend::gemm`, and the
/// same bits on 1 and 2 threads (an odd row count: unequal halves); split (a weight taller than
/// wide, and one wider than tall) and not split (few rows).
#[test]
fn backward_products_split_by_rows_equal_the_plain_products() {
    use taproot::backend::Trans;
    let _turn = turn();
    for (n, c, oc) in [(1101, 24, 40), (1101, 40, 24), (37, 40, 24)] {
        let mut rng = Rng::new(13);
        let (dout, inp) = (randn(&mut rng, n * oc, 1.0), randn(&mut rng, n * c, 1.0));
        let (w, dw0) = (randn(&mut rng, oc * c, 0.5), randn(&mut rng, oc * c, 0.5));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
            pool.install(|| {
                let be = B::default();
                let (d, x, wb, dw, dinp) = (buf(&be, &dout), buf(&be, &inp), buf(&be, &w), buf(&be, &dw0), be.alloc(n * c));
                let v = B::whole;
                be.matmul_backward(Some(v(&dinp)), v(&dw), None, v(&d), v(&x), v(&wb), n, c, oc);
                [host(&be, &dinp), host(&be, &dw)]
            })
        };
        let got = run(2);
        assert_eq!(got, run(1), "({n}, {c}, {oc}): the bits depend on the thread count");
        let be = B::default();
        let (d, x, wb, dw, dinp) = (buf(&be, &dout), buf(&be, &inp), buf(&be, &w), buf(&be, &dw0), be.alloc(n * c));
        let v = B::whole;
        be.gemm(v(&dinp), v(&d), Trans::N, v(&wb), Trans::N, n, c, oc, 1.0, 0.0);
        be.gemm(v(&dw), v(&d), Trans::T, v(&x), Trans::N, oc, c, n, 1.0, 1.0);
        for (k, want) in [host(&be, &dinp), host(&be, &dw)].iter().enumerate() {
            for (i, (a, b)) in got[k].iter().zip(want).enumerate() {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "({n}, {c}, {oc}) output {k} element {i}: {a}, plain {b}");
            }
        }
    }
}

/// The residual add fused with the norm after it gives the bits of the add (or copy + axpby,
/// α ≠ 1) and the norm in turn, for LayerNorm and RMSNorm, and the same bits on 1 and 2 threads.
#[test]
fn fused_residual_norms_equal_the_ops_in_turn() {
    let _turn = turn();
    let (n, c) = (301, 40);
    let mut rng = Rng::new(12);
    let (x, y) = (randn(&mut rng, n * c, 1.0), randn(&mut rng, n * c, 1.0));
    let (w, b) = (randn(&mut rng, c, 0.5), randn(&mut rng, c, 0.5));
    for alpha in [1.0, 0.5] {
        let run = |fused: bool, threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
            pool.install(|| {
                let be = B::default();
                let (xb, yb, wb, bb) = (buf(&be, &x), buf(&be, &y), buf(&be, &w), buf(&be, &b));
                let bufs: Vec<_> = (0..6).map(|_| buf(&be, &vec![7.0; n * c])).collect();
                let v = B::whole;
                let [res, out, mean, rstd, res2, rms] = [0, 1, 2, 3, 4, 5].map(|i| v(&bufs[i]));
                let (mean, rstd) = (mean.sub(0, n), rstd.sub(0, n));
                let rstd2 = v(&bufs[2]).sub(n, n);
                if fused {
                    be.residual_layernorm_forward(res, out, mean, rstd, v(&xb), v(&yb), alpha, v(&wb), v(&bb), n, c);
                    be.residual_rmsnorm_forward(res2, rms, rstd2, v(&xb), v(&yb), alpha, v(&wb), n, c, 1e-6);
                } else {
                    if alpha == 1.0 {
                        be.add(res, v(&xb), v(&yb));
                        be.add(res2, v(&xb), v(&yb));
                    } else {
                        for r in [res, res2] {
                            be.copy(r, v(&xb));
                            be.axpby(r, 1.0, alpha, v(&yb));
                        }
                    }
                    be.layernorm_forward(out, mean, rstd, res, v(&wb), v(&bb), n, c);
                    be.rmsnorm_forward(rms, rstd2, res2, v(&wb), n, c, 1e-6);
                }
                bufs.iter().map(|b| host(&be, b)).collect::<Vec<_>>()
            })
        };
        let fused = run(true, 2);
        assert_eq!(fused, run(false, 2), "alpha {alpha}: fused residual norms differ from the ops in turn");
        assert_eq!(fused, run(true, 1), "alpha {alpha}: the fused bits depend on the thread count");
        assert!(fused[1].iter().any(|&o| o != 7.0) && fused[5].iter().any(|&o| o != 7.0), "nothing was written");
    }
}

/// The elementwise kernels' AVX-512 copies give the bits of their baseline copies: a GPT-2 step
/// (GELU, softmax, cross-entropy, AdamW, attention's AVX-512 or AVX2 tiles) and a LLaMA step
/// (SwiGLU) with them on and off. Where
/// the CPU has no AVX-512 both runs take the baseline, and the test says so.
#[test]
fn wide_elementwise_copies_give_the_baseline_bits() {
    use taproot::backend::cpu::wide;
    let _turn = turn();
    if !wide::enabled() {
        println!("this CPU has no AVX-512: both runs take the baseline kernels");
    }
    let run = |on: bool| {
        wide::set_enabled(on);
        let be = B::default();
        let (mut m, batch) = model(&be, 2);
        let mut out = step(&be, &mut m, &batch);
        let dims = Dims::llama(64, 16, 32, 4, 2, Dims::default_ffn_hidden(32));
        let mut l = Model::new(&be, dims, 2, &InitConfig::new(InitScheme::Gpt2, 2, 7));
        out.extend(step(&be, &mut l, &batch));
        out
    };
    let (wide_bits, base_bits) = (run(true), run(false));
    wide::set_enabled(true);
    assert_eq!(wide_bits, base_bits);
}

/// Products with few output columns (a router's) take their own kernels: against the plain
/// products through `Backend::gemm` (bias and accumulated weight gradient included), the same
/// bits on 1 and 2 threads, and the same bits from the AVX-512 kernels and their plain-loop
/// copies. Shapes: column counts with and without a tail of 16, row counts over and under a
/// block, output widths 1, 3, 8 and 16, and a dout with zeros (a router's unselected experts).
/// A product with no output columns stays the empty product it was.
#[test]
fn narrow_products_equal_the_plain_products() {
    use taproot::backend::cpu::wide;
    use taproot::backend::Trans;
    let _turn = turn();
    {
        let be = B::default();
        let (x, empty) = (buf(&be, &[1.0; 12]), be.alloc(0));
        be.matmul_forward(B::whole(&empty), B::whole(&x), B::whole(&empty), None, 3, 4, 0);
        assert_eq!(host(&be, &x), [1.0; 12], "the input changed");
    }
    for (n, c, oc) in [(2048, 128, 8), (301, 100, 3), (517, 37, 16), (9, 16, 1)] {
        let mut rng = Rng::new(17);
        let (mut dout, inp) = (randn(&mut rng, n * oc, 1.0), randn(&mut rng, n * c, 1.0));
        dout.iter_mut().step_by(3).for_each(|d| *d = 0.0);
        let (w, b, dw0) = (randn(&mut rng, oc * c, 0.5), randn(&mut rng, oc, 0.5), randn(&mut rng, oc * c, 0.5));
        let run = |threads: usize, avx512: bool| {
            wide::set_enabled(avx512);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
            let got = pool.install(|| {
                let be = B::default();
                let (d, x, wb, bb, dw) = (buf(&be, &dout), buf(&be, &inp), buf(&be, &w), buf(&be, &b), buf(&be, &dw0));
                let (out, dinp) = (be.alloc(n * oc), be.alloc(n * c));
                let v = B::whole;
                be.matmul_forward(v(&out), v(&x), v(&wb), Some(v(&bb)), n, c, oc);
                be.matmul_backward(Some(v(&dinp)), v(&dw), None, v(&d), v(&x), v(&wb), n, c, oc);
                let dw_only = buf(&be, &dw0);
                be.matmul_backward(None, v(&dw_only), None, v(&d), v(&x), v(&wb), n, c, oc);
                [host(&be, &out), host(&be, &dinp), host(&be, &dw), host(&be, &dw_only)]
            });
            wide::set_enabled(true);
            got
        };
        let got = run(2, true);
        assert_eq!(got, run(1, true), "({n}, {c}, {oc}): the bits depend on the thread count");
        assert_eq!(got, run(2, false), "({n}, {c}, {oc}): the AVX-512 kernels and the plain loops differ");
        assert_eq!(got[2], got[3], "({n}, {c}, {oc}): the weight gradient depends on dinp being asked for");
        let be = B::default();
        let (d, x, wb, dw) = (buf(&be, &dout), buf(&be, &inp), buf(&be, &w), buf(&be, &dw0));
        let (out, dinp) = (buf(&be, &b.repeat(n)), be.alloc(n * c));
        let v = B::whole;
        be.gemm(v(&out), v(&x), Trans::N, v(&wb), Trans::T, n, oc, c, 1.0, 1.0);
        be.gemm(v(&dinp), v(&d), Trans::N, v(&wb), Trans::N, n, c, oc, 1.0, 0.0);
        be.gemm(v(&dw), v(&d), Trans::T, v(&x), Trans::N, oc, c, n, 1.0, 1.0);
        for (k, want) in [host(&be, &out), host(&be, &dinp), host(&be, &dw)].iter().enumerate() {
            assert!(want.iter().any(|&x| x != 0.0), "({n}, {c}, {oc}) output {k}: the reference is all zero");
            for (i, (a, b)) in got[k].iter().zip(want).enumerate() {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "({n}, {c}, {oc}) output {k} element {i}: {a}, plain {b}");
            }
        }
    }
}

/// A fill past the streaming-store threshold (a large model's gradients) writes every element
/// of its view, an unaligned one included, and nothing outside it.
#[test]
fn a_large_fill_writes_its_view_and_nothing_else() {
    let be = B::default();
    let n = (1 << 21) + 37;
    let x = buf(&be, &vec![1.0; n + 10]);
    be.fill(B::whole(&x).sub(3, n), 2.5);
    let got = host(&be, &x);
    assert!(got[..3].iter().chain(&got[n + 3..]).all(|&v| v == 1.0), "the fill wrote outside its view");
    assert!(got[3..n + 3].iter().all(|&v| v == 2.5), "the fill missed elements of its view");
}

/// Zeroing gradients (streaming stores from 64K floats on) writes zeros over every element of
/// its view, unaligned ones included, and nothing outside it: below, at and past the threshold,
/// and through a model's `zero_grad` after a step.
#[test]
fn zeroing_gradients_writes_its_view_and_nothing_else() {
    let be = B::default();
    for n in [1000, 1 << 16, (1 << 16) + 37, (1 << 20) + 5] {
        let x = buf(&be, &vec![1.5; n + 10]);
        be.zero_grads(B::whole(&x).sub(3, n));
        let got = host(&be, &x);
        assert!(got[..3].iter().chain(&got[n + 3..]).all(|&v| v == 1.5), "{n}: zeroing wrote outside its view");
        assert!(got[3..n + 3].iter().all(|&v| v.to_bits() == 0), "{n}: zeroing missed elements of its view");
    }
    let _turn = turn();
    let (mut m, batch) = model(&be, 2);
    step(&be, &mut m, &batch);
    m.forward_backward(&be, &batch, 1.0 / 32.0);
    assert!(host(&be, &m.blocks[0].w.grads).iter().any(|&g| g != 0.0), "the backward left no gradient");
    m.zero_grad(&be);
    for w in [&m.embed.w, &m.head.w].into_iter().chain(m.blocks.iter().map(|b| &b.w)) {
        assert!(host(&be, &w.grads).iter().all(|&g| g.to_bits() == 0), "a gradient survived zero_grad");
    }
}

/// Forward products run by blocks of rows and columns side by side (256 × 512 over a short
/// inner dimension, 1024 × 192 over a long one): against `Backend::gemm`, bias included, on
/// ragged shapes (rows past one block, columns past one or several), and the same bits on 1
/// and 2 threads.
#[test]
fn forward_products_by_blocks_equal_the_plain_product() {
    use taproot::backend::Trans;
    let _turn = turn();
    for (n, c, oc) in [(1100, 300, 400), (300, 40, 530), (70, 520, 200)] {
        let mut rng = Rng::new(19);
        let (inp, w, b) = (randn(&mut rng, n * c, 1.0), randn(&mut rng, oc * c, 0.3), randn(&mut rng, oc, 0.3));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
            pool.install(|| {
                let be = B::default();
                let (x, wb, bb, out) = (buf(&be, &inp), buf(&be, &w), buf(&be, &b), be.alloc(n * oc));
                be.matmul_forward(B::whole(&out), B::whole(&x), B::whole(&wb), Some(B::whole(&bb)), n, c, oc);
                host(&be, &out)
            })
        };
        let got = run(2);
        assert_eq!(got, run(1), "({n}, {c}, {oc}): the bits depend on the thread count");
        let be = B::default();
        let (x, wb, out) = (buf(&be, &inp), buf(&be, &w), buf(&be, &b.repeat(n)));
        be.gemm(B::whole(&out), B::whole(&x), Trans::N, B::whole(&wb), Trans::T, n, oc, c, 1.0, 1.0);
        for (i, (a, want)) in got.iter().zip(host(&be, &out)).enumerate() {
            assert!((a - want).abs() <= 1e-4 * want.abs().max(1.0), "({n}, {c}, {oc}) element {i}: {a}, plain {want}");
        }
    }
}

/// The MoE's fused backend ops against the ops they stand for, in turn, bit for bit: the
/// gathered grouped products (`gather_rows` then the grouped forward, and the grouped backward
/// of the gathered rows), the combine's backward with the down products' backward, and a
/// router's input gradient added in place (`matmul_backward_add`, narrow and wide). On 1 and 2
/// threads, in fp32 and bf16, with an expert with no tokens and one whose rows pass the size of
/// a task's tile (4,200 rows of 64).
#[test]
fn fused_moe_ops_equal_the_ops_in_turn() {
    use taproot::backend::{MoeCombine, Precision};
    use taproot::model::moe::Plan;
    let _turn = turn();
    let (n, k, e, c, f) = (4200, 2, 5, 64, 24);
    let m = n * k;
    let mut rng = Rng::new(23);
    // Every token's first choice is expert 0 (the large one), its second one of 2..5 (1 gets none).
    let experts: Vec<u32> = (0..n).flat_map(|_| [0, 2 + rng.below(3) as u32]).collect();
    let plan = Plan::new(&experts, n, e, k);
    assert!(plan.count(0) * c > 1 << 18 && plan.count(1) == 0, "the shapes miss a case");
    let x = randn(&mut rng, n * c, 1.0);
    let (dgu, dy, ys) = (randn(&mut rng, m * f, 1.0), randn(&mut rng, n * c, 1.0), randn(&mut rng, m * c, 1.0));
    let (weights, h) = (randn(&mut rng, m, 0.5), randn(&mut rng, m * f, 1.0));
    let wu: Vec<Vec<f32>> = (0..e).map(|_| randn(&mut rng, f * c, 0.5)).collect(); // C → F
    let wd: Vec<Vec<f32>> = (0..e).map(|_| randn(&mut rng, c * f, 0.5)).collect(); // F → C
    let (dlogits, wr, wwide) = (randn(&mut rng, n * e, 1.0), randn(&mut rng, e * c, 0.5), randn(&mut rng, 40 * c, 0.5));
    let dwide = randn(&mut rng, n * 40, 1.0);
    let run = |threads: usize, precision: Precision, fused: bool| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
        pool.install(|| {
            let be = B::default();
            be.set_precision(precision).expect("a precision");
            let v = B::whole;
            let (xb, dgub, dyb, ysb, wb, hb) =
                (buf(&be, &x), buf(&be, &dgu), buf(&be, &dy), buf(&be, &ys), buf(&be, &weights), buf(&be, &h));
            let (wub, wdb): (Vec<_>, Vec<_>) = (wu.iter().map(|w| buf(&be, w)).collect(), wd.iter().map(|w| buf(&be, w)).collect());
            let (dwu, dwd): (Vec<_>, Vec<_>) =
                ((0..e).map(|_| buf(&be, &vec![0.25; f * c])).collect(), (0..e).map(|_| buf(&be, &vec![0.25; c * f])).collect());
            let (rows, slots) = (be.alloc_ids(m), be.alloc_ids(m));
            be.upload_ids(&rows, &plan.rows);
            be.upload_ids(&slots, &plan.slots);
            let (xs, gu, dxs, dys, dweights, dh) =
                (be.alloc(m * c), be.alloc(m * f), be.alloc(m * c), be.alloc(m * c), be.alloc(m), be.alloc(m * f));
            let live: Vec<usize> = (0..e).filter(|&x| plan.count(x) > 0).collect();
            let seg = |out, inp, w| segs(&plan, &live, out, inp, w);
            let views = |b, width| rows_of(&plan, &live, b, width);

            let (up_f, up_b) = (seg((&gu, f), (&xs, c), &wub), seg((&dgub, f), (&xs, c), &wub));
            let down = seg((&dys, c), (&hb, f), &wdb);
            let comb =
                MoeCombine::<B> { dys: v(&dys), dweights: v(&dweights), dout: v(&dyb), ys: v(&ysb), slots: &slots, weights: v(&wb), n, k };
            // The router's input gradient joins dx, narrow (E outputs) and wide (40).
            let (dxr, dxw, scratch) = (buf(&be, &dy), buf(&be, &dy), be.alloc(n * c));
            let (dwr, dww) = (be.alloc(e * c), be.alloc(40 * c));
            let (dl, wrb, dwb, wwb) = (buf(&be, &dlogits), buf(&be, &wr), buf(&be, &dwide), buf(&be, &wwide));
            if fused {
                be.matmul_forward_segments_gathered(&up_f, v(&xs), v(&xb), &rows, c, f);
                be.matmul_backward_segments(&up_b, &views(&dxs, c), &each(&live, &dwu), c, f);
                be.moe_combine_backward_segments(&down, &views(&dh, f), &each(&live, &dwd), comb, f, c);
                be.matmul_backward_add(v(&dxr), v(&scratch), v(&dwr), None, v(&dl), v(&xb), v(&wrb), n, c, e);
                be.matmul_backward_add(v(&dxw), v(&scratch), v(&dww), None, v(&dwb), v(&xb), v(&wwb), n, c, 40);
            } else {
                be.gather_rows(v(&xs), v(&xb), &rows, m, c);
                be.matmul_forward_segments(&up_f, c, f);
                be.matmul_backward_segments(&up_b, &views(&dxs, c), &each(&live, &dwu), c, f);
                be.moe_combine_backward(v(&dys), v(&dweights), v(&dyb), v(&ysb), &slots, v(&wb), n, k, c);
                be.matmul_backward_segments(&down, &views(&dh, f), &each(&live, &dwd), f, c);
                for (dx, dw, d, w, oc) in [(&dxr, &dwr, &dl, &wrb, e), (&dxw, &dww, &dwb, &wwb, 40)] {
                    be.matmul_backward(Some(v(&scratch)), v(dw), None, v(d), v(&xb), v(w), n, c, oc);
                    be.add_assign(v(dx), v(&scratch));
                }
            }
            let mut out = vec![host(&be, &xs), host(&be, &gu), host(&be, &dxs), host(&be, &dweights), host(&be, &dh)];
            out.extend(dwu.iter().chain(&dwd).chain([&dwr, &dww, &dxr, &dxw]).map(|b| host(&be, b)));
            out
        })
    };
    for precision in [Precision::Fp32, Precision::Bf16] {
        let want = run(2, precision, false);
        assert!(want.iter().all(|o| o.iter().any(|&x| x != 0.0)), "{precision:?}: an output is all zero");
        for threads in [1, 2] {
            let got = run(threads, precision, true);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g == w, "{precision:?}, {threads} threads: output {i} differs from the ops in turn");
            }
        }
    }
}

type Buf = <B as Backend>::Buf;

/// The experts with rows (`live`) as segments of a grouped product: their rows of `out` and
/// `inp` (of the given row widths) and their weights.
fn segs<'a>(
    plan: &taproot::model::moe::Plan,
    live: &[usize],
    out: (&'a Buf, usize),
    inp: (&'a Buf, usize),
    w: &'a [Buf],
) -> Vec<taproot::backend::Segment<'a, Buf>> {
    let at = |b: &'a Buf, width: usize, x: usize| taproot::backend::View::new(b, plan.offsets[x] * width, plan.count(x) * width);
    live.iter()
        .map(|&x| taproot::backend::Segment { out: at(out.0, out.1, x), inp: at(inp.0, inp.1, x), w: B::whole(&w[x]), rows: plan.count(x) })
        .collect()
}

/// The experts' (`live`) rows of `b` (rows of `width`).
fn rows_of<'a>(plan: &taproot::model::moe::Plan, live: &[usize], b: &'a Buf, width: usize) -> Vec<taproot::backend::View<'a, Buf>> {
    live.iter().map(|&x| taproot::backend::View::new(b, plan.offsets[x] * width, plan.count(x) * width)).collect()
}

/// The whole of each of `live`'s buffers.
fn each<'a>(live: &[usize], bufs: &'a [Buf]) -> Vec<taproot::backend::View<'a, Buf>> {
    live.iter().map(|&x| B::whole(&bufs[x])).collect()
}
