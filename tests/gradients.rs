//! Finite-difference checks of every backward: one per op, and a whole tiny model (0, 1 and 2
//! blocks, tied head) for every parameter tensor and for the embedding output (the input of the
//! block stack).
//!
//! Tolerance (f32 forward): central differences with step h = 1e-2 on unit-scale inputs; a check
//! passes when, over the sampled entries of a tensor, ‖g_fd − g‖ / ‖g‖ ≤ 1e-2. With f32 losses
//! summed in f64 the rounding part of the FD error is ~1e-5 absolute, the truncation part O(h²);
//! a wrong backward (a missing term, a transposed index) shows up as errors of 10% or more.

use taproot::backend::cpu::CpuBackend;
use taproot::backend::Backend;
use taproot::model::init::{InitConfig, InitScheme};
use taproot::model::moe::{Mlp, Moe, Routing};
use taproot::model::{Arch, Batch, Block, Dims, Model};
use taproot::params::ParamSet;
use taproot::rng::Rng;

mod common;

use common::{buf, host, randn};

type B = CpuBackend;

const H: f32 = 1e-2;
const TOL: f64 = 1e-2;

/// Compare analytic gradient entries with central differences of `loss` at `indices`.
fn check(name: &str, analytic: &[f32], indices: &[usize], mut loss: impl FnMut(usize, f32) -> f64) {
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for &i in indices {
        let fd = (loss(i, H) - loss(i, -H)) / (2.0 * H as f64);
        let an = analytic[i] as f64;
        num += (fd - an) * (fd - an);
        den += an * an;
    }
    let rel = num.sqrt() / den.sqrt().max(1e-12);
    assert!(den > 0.0, "{name}: analytic gradient is zero on every sampled entry");
    assert!(rel <= TOL, "{name}: finite-difference mismatch, relative error {rel:.3e} > {TOL:e}");
}

/// L = sum(out * r): the upstream gradient of `out` is `r`.
fn dot(a: &[f32], r: &[f32]) -> f64 {
    a.iter().zip(r).map(|(x, y)| *x as f64 * *y as f64).sum()
}

#[test]
fn matmul_backward_matches_finite_differences() {
    let be = B::default();
    let mut rng = Rng::new(1);
    let (n, c, oc) = (6, 5, 7);
    let inp = randn(&mut rng, n * c, 1.0);
    let w = randn(&mut rng, oc * c, 1.0);
    let bias = randn(&mut rng, oc, 1.0);
    let r = randn(&mut rng, n * oc, 1.0);
    let f = |inp: &[f32], w: &[f32], b: &[f32]| {
        let out = be.alloc(n * oc);
        let (ib, wb, bb) = (buf(&be, inp), buf(&be, w), buf(&be, b));
        be.matmul_forward(B::whole(&out), B::whole(&ib), B::whole(&wb), Some(B::whole(&bb)), n, c, oc);
        dot(&host(&be, &out), &r)
    };
    let (ib, wb, rb) = (buf(&be, &inp), buf(&be, &w), buf(&be, &r));
    let (dinp, dw, db) = (be.alloc(n * c), be.alloc(oc * c), be.alloc(oc));
    be.matmul_backward(Some(B::whole(&dinp)), B::whole(&dw), Some(B::whole(&db)), B::whole(&rb), B::whole(&ib), B::whole(&wb), n, c, oc);
    let all = |n| (0..n).collect::<Vec<_>>();
    check("matmul dinp", &host(&be, &dinp), &all(n * c), |i, h| {
        let mut x = inp.clone();
        x[i] += h;
        f(&x, &w, &bias)
    });
    check("matmul dw", &host(&be, &dw), &all(oc * c), |i, h| {
        let mut x = w.clone();
        x[i] += h;
        f(&inp, &x, &bias)
    });
    check("matmul db", &host(&be, &db), &all(oc), |i, h| {
        let mut x = bias.clone();
        x[i] += h;
        f(&inp, &w, &x)
    });
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let be = B::default();
    let mut rng = Rng::new(2);
    let (n, c) = (4, 8);
    let inp = randn(&mut rng, n * c, 1.0);
    let w: Vec<f32> = randn(&mut rng, c, 0.3).iter().map(|x| 1.0 + x).collect();
    let b = randn(&mut rng, c, 0.3);
    let r = randn(&mut rng, n * c, 1.0);
    let f = |inp: &[f32], w: &[f32], b: &[f32]| {
        let (out, mean, rstd) = (be.alloc(n * c), be.alloc(n), be.alloc(n));
        let (ib, wb, bb) = (buf(&be, inp), buf(&be, w), buf(&be, b));
        be.layernorm_forward(B::whole(&out), B::whole(&mean), B::whole(&rstd), B::whole(&ib), B::whole(&wb), B::whole(&bb), n, c);
        dot(&host(&be, &out), &r)
    };
    let (out, mean, rstd) = (be.alloc(n * c), be.alloc(n), be.alloc(n));
    let (ib, wb, bb, rb) = (buf(&be, &inp), buf(&be, &w), buf(&be, &b), buf(&be, &r));
    be.layernorm_forward(B::whole(&out), B::whole(&mean), B::whole(&rstd), B::whole(&ib), B::whole(&wb), B::whole(&bb), n, c);
    // dinp accumulates: start it at a known value and subtract it afterwards.
    let base = randn(&mut rng, n * c, 1.0);
    let dinp = buf(&be, &base);
    let (dw, db) = (be.alloc(c), be.alloc(c));
    be.layernorm_backward(
        B::whole(&dinp),
        B::whole(&dw),
        B::whole(&db),
        B::whole(&rb),
        B::whole(&ib),
        B::whole(&wb),
        B::whole(&mean),
        B::whole(&rstd),
        n,
        c,
    );
    let dinp: Vec<f32> = host(&be, &dinp).iter().zip(&base).map(|(a, b)| a - b).collect();
    let all = |n| (0..n).collect::<Vec<_>>();
    check("layernorm dinp", &dinp, &all(n * c), |i, h| {
        let mut x = inp.clone();
        x[i] += h;
        f(&x, &w, &b)
    });
    check("layernorm dw", &host(&be, &dw), &all(c), |i, h| {
        let mut x = w.clone();
        x[i] += h;
        f(&inp, &x, &b)
    });
    check("layernorm db", &host(&be, &db), &all(c), |i, h| {
        let mut x = b.clone();
        x[i] += h;
        f(&inp, &w, &x)
    });
}

#[test]
fn attention_backward_matches_finite_differences() {
    let be = B::default();
    let mut rng = Rng::new(3);
    let (b, t, c, nh) = (2, 5, 8, 2);
    let qkv = randn(&mut rng, b * t * 3 * c, 1.0);
    let r = randn(&mut rng, b * t * c, 1.0);
    let f = |qkv: &[f32]| {
        let (out, att) = (be.alloc(b * t * c), be.alloc(b * nh * t * t));
        let qb = buf(&be, qkv);
        be.attention_forward(B::whole(&out), B::whole(&att), B::whole(&qb), b, t, c, nh);
        dot(&host(&be, &out), &r)
    };
    let (out, att) = (be.alloc(b * t * c), be.alloc(b * nh * t * t));
    let (qb, rb) = (buf(&be, &qkv), buf(&be, &r));
    be.attention_forward(B::whole(&out), B::whole(&att), B::whole(&qb), b, t, c, nh);
    // Causality: every probability above the diagonal is exactly zero, every row sums to one.
    let a = host(&be, &att);
    for row in 0..b * nh * t {
        let ti = row % t;
        let p = &a[row * t..row * t + t];
        assert!(p[ti + 1..].iter().all(|&x| x == 0.0), "attention looks into the future");
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    let (dqkv, datt) = (buf(&be, &vec![7.0; b * t * 3 * c]), be.alloc(b * nh * t * t));
    be.attention_backward(B::whole(&dqkv), B::whole(&datt), B::whole(&rb), B::whole(&qb), B::whole(&out), B::whole(&att), b, t, c, nh);
    check("attention dqkv", &host(&be, &dqkv), &(0..b * t * 3 * c).collect::<Vec<_>>(), |i, h| {
        let mut x = qkv.clone();
        x[i] += h;
        f(&x)
    });
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let be = B::default();
    let mut rng = Rng::new(4);
    let n = 64;
    let inp = randn(&mut rng, n, 2.0);
    let r = randn(&mut rng, n, 1.0);
    let f = |inp: &[f32]| {
        let out = be.alloc(n);
        be.gelu_forward(B::whole(&out), B::whole(&buf(&be, inp)));
        dot(&host(&be, &out), &r)
    };
    let dinp = be.alloc(n);
    be.gelu_backward(B::whole(&dinp), B::whole(&buf(&be, &inp)), B::whole(&buf(&be, &r)));
    check("gelu dinp", &host(&be, &dinp), &(0..n).collect::<Vec<_>>(), |i, h| {
        let mut x = inp.clone();
        x[i] += h;
        f(&x)
    });
    // Spot value: gelu(1) with the tanh approximation is 0.841192.
    let out = be.alloc(1);
    be.gelu_forward(B::whole(&out), B::whole(&buf(&be, &[1.0])));
    assert!((host(&be, &out)[0] - 0.841_192).abs() < 1e-5);
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let be = B::default();
    let mut rng = Rng::new(21);
    let (n, c, eps) = (4, 8, 1e-6);
    let inp = randn(&mut rng, n * c, 1.0);
    let w: Vec<f32> = randn(&mut rng, c, 0.3).iter().map(|x| 1.0 + x).collect();
    let r = randn(&mut rng, n * c, 1.0);
    let f = |inp: &[f32], w: &[f32]| {
        let (out, rstd) = (be.alloc(n * c), be.alloc(n));
        be.rmsnorm_forward(B::whole(&out), B::whole(&rstd), B::whole(&buf(&be, inp)), B::whole(&buf(&be, w)), n, c, eps);
        dot(&host(&be, &out), &r)
    };
    let (out, rstd) = (be.alloc(n * c), be.alloc(n));
    let (ib, wb, rb) = (buf(&be, &inp), buf(&be, &w), buf(&be, &r));
    be.rmsnorm_forward(B::whole(&out), B::whole(&rstd), B::whole(&ib), B::whole(&wb), n, c, eps);
    // Its definition: x / sqrt(mean(x²) + eps) · w.
    let o = host(&be, &out);
    for row in 0..n {
        let x = &inp[row * c..(row + 1) * c];
        let rs = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / c as f32 + eps).sqrt();
        for i in 0..c {
            assert!((o[row * c + i] - x[i] * rs * w[i]).abs() < 1e-5);
        }
    }
    // dinp accumulates: start it at a known value and subtract it afterwards.
    let base = randn(&mut rng, n * c, 1.0);
    let dinp = buf(&be, &base);
    let dw = be.alloc(c);
    be.rmsnorm_backward(B::whole(&dinp), B::whole(&dw), B::whole(&rb), B::whole(&ib), B::whole(&wb), B::whole(&rstd), n, c);
    let dinp: Vec<f32> = host(&be, &dinp).iter().zip(&base).map(|(a, b)| a - b).collect();
    let all = |n| (0..n).collect::<Vec<_>>();
    check("rmsnorm dinp", &dinp, &all(n * c), |i, h| {
        let mut x = inp.clone();
        x[i] += h;
        f(&x, &w)
    });
    check("rmsnorm dw", &host(&be, &dw), &all(c), |i, h| {
        let mut x = w.clone();
        x[i] += h;
        f(&inp, &x)
    });
}

#[test]
fn rope_is_a_rotation_and_its_backward_matches_finite_differences() {
    let be = B::default();
    let mut rng = Rng::new(22);
    // 2 sequences of 3 positions; rows of 5 heads of 4, the first 3 heads rotated (q and k
    // heads of a fused qkv row), the rest untouched.
    let (b, t, heads, hd, stride, theta) = (2, 3, 3, 4, 20, 10_000.0f32);
    let rows = b * t;
    let x = randn(&mut rng, rows * stride, 1.0);
    let r = randn(&mut rng, rows * stride, 1.0);
    let f = |x: &[f32]| {
        let xb = buf(&be, x);
        be.rope(B::whole(&xb), rows, t, stride, heads, hd, theta, false);
        dot(&host(&be, &xb), &r)
    };
    let xb = buf(&be, &x);
    be.rope(B::whole(&xb), rows, t, stride, heads, hd, theta, false);
    let y = host(&be, &xb);
    // Its definition, at position 1 (row 1), head 2, pair 1: angle 1 · θ^(-2/4).
    let (i, h, row) = (1, 2, 1);
    let a = (theta as f64).powf(-0.5);
    let (x0, x1) = (x[row * stride + h * hd + i] as f64, x[row * stride + h * hd + i + 2] as f64);
    assert!((y[row * stride + h * hd + i] as f64 - (x0 * a.cos() - x1 * a.sin())).abs() < 1e-6);
    assert!((y[row * stride + h * hd + i + 2] as f64 - (x1 * a.cos() + x0 * a.sin())).abs() < 1e-6);
    // Position 0 and the heads past `heads` are unchanged; norms are kept.
    assert_eq!(&y[..heads * hd], &x[..heads * hd]);
    assert_eq!(&y[stride + heads * hd..2 * stride], &x[stride + heads * hd..2 * stride]);
    let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
    assert!((norm(&y) - norm(&x)).abs() < 1e-4 * norm(&x));
    // The backward is the inverse rotation of the upstream gradient.
    let g = buf(&be, &r);
    be.rope(B::whole(&g), rows, t, stride, heads, hd, theta, true);
    check("rope dx", &host(&be, &g), &(0..rows * stride).collect::<Vec<_>>(), |i, h| {
        let mut v = x.clone();
        v[i] += h;
        f(&v)
    });
    // Forward then inverse is the identity.
    be.rope(B::whole(&xb), rows, t, stride, heads, hd, theta, true);
    for (a, b) in host(&be, &xb).iter().zip(&x) {
        assert!((a - b).abs() < 1e-5);
    }
}

#[test]
fn gqa_expand_repeats_each_kv_head_for_its_group_and_reduce_is_its_adjoint() {
    let be = B::default();
    let mut rng = Rng::new(24);
    // 4 query heads sharing 2 key/value heads of size 3, 5 rows.
    let (n, nh, kv, hd) = (5, 4, 2, 3);
    let (wi, wo) = ((nh + 2 * kv) * hd, 3 * nh * hd);
    let x = randn(&mut rng, n * wi, 1.0);
    let y = randn(&mut rng, n * wo, 1.0);
    let out = be.alloc(n * wo);
    be.gqa_expand(B::whole(&out), B::whole(&buf(&be, &x)), n, nh, kv, hd);
    let e = host(&be, &out);
    // Its definition: q as is; query head h's key and value are kv head h / 2's.
    for r in 0..n {
        for h in 0..nh {
            for k in 0..hd {
                assert_eq!(e[r * wo + h * hd + k], x[r * wi + h * hd + k]);
                assert_eq!(e[r * wo + nh * hd + h * hd + k], x[r * wi + nh * hd + (h / 2) * hd + k]);
                assert_eq!(e[r * wo + 2 * nh * hd + h * hd + k], x[r * wi + (nh + kv) * hd + (h / 2) * hd + k]);
            }
        }
    }
    // The backward is the adjoint: <expand(x), y> = <x, reduce(y)>, and it is exactly what
    // finite differences of L = <expand(x), y> give.
    let d = be.alloc(n * wi);
    be.gqa_reduce(B::whole(&d), B::whole(&buf(&be, &y)), n, nh, kv, hd);
    let d = host(&be, &d);
    assert!((dot(&e, &y) - dot(&x, &d)).abs() < 1e-4);
    check("gqa dinp", &d, &(0..n * wi).collect::<Vec<_>>(), |i, h| {
        let mut v = x.clone();
        v[i] += h;
        let o = be.alloc(n * wo);
        be.gqa_expand(B::whole(&o), B::whole(&buf(&be, &v)), n, nh, kv, hd);
        dot(&host(&be, &o), &y)
    });
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let be = B::default();
    let mut rng = Rng::new(23);
    let (n, f) = (3, 5);
    let inp = randn(&mut rng, n * 2 * f, 2.0);
    let r = randn(&mut rng, n * f, 1.0);
    let fw = |inp: &[f32]| {
        let out = be.alloc(n * f);
        be.swiglu_forward(B::whole(&out), B::whole(&buf(&be, inp)), n, f);
        host(&be, &out)
    };
    // Its definition: silu(g) · u.
    let o = fw(&inp);
    for row in 0..n {
        for i in 0..f {
            let (g, u) = (inp[row * 2 * f + i], inp[row * 2 * f + f + i]);
            assert!((o[row * f + i] - g / (1.0 + (-g).exp()) * u).abs() < 1e-5);
        }
    }
    let dinp = be.alloc(n * 2 * f);
    be.swiglu_backward(B::whole(&dinp), B::whole(&buf(&be, &inp)), B::whole(&buf(&be, &r)), n, f);
    check("swiglu dinp", &host(&be, &dinp), &(0..n * 2 * f).collect::<Vec<_>>(), |i, h| {
        let mut x = inp.clone();
        x[i] += h;
        dot(&fw(&x), &r)
    });
}

#[test]
fn residual_and_encoder_backward_match_finite_differences() {
    let be = B::default();
    let mut rng = Rng::new(5);
    let (b, t, c, vp, maxt) = (2, 3, 4, 8, 5);
    let ids: Vec<u32> = vec![1, 3, 1, 0, 7, 3];
    let idb = be.alloc_ids(b * t);
    be.upload_ids(&idb, &ids);
    let wte = randn(&mut rng, vp * c, 1.0);
    let wpe = randn(&mut rng, maxt * c, 1.0);
    let other = randn(&mut rng, b * t * c, 1.0);
    let r = randn(&mut rng, b * t * c, 1.0);
    // L = sum((encoder(wte, wpe) + other) * r): exercises encoder and residual add together.
    let f = |wte: &[f32], wpe: &[f32]| {
        let (x, y) = (be.alloc(b * t * c), be.alloc(b * t * c));
        be.encoder_forward(B::whole(&x), &idb, B::whole(&buf(&be, wte)), Some(B::whole(&buf(&be, wpe))), b, t, c);
        be.add(B::whole(&y), B::whole(&x), B::whole(&buf(&be, &other)));
        dot(&host(&be, &y), &r)
    };
    // residual backward: the gradient passes unchanged to both inputs, accumulated with add_assign
    let dx = be.alloc(b * t * c);
    be.add_assign(B::whole(&dx), B::whole(&buf(&be, &r)));
    let (dwte, dwpe) = (be.alloc(vp * c), be.alloc(maxt * c));
    be.encoder_backward(B::whole(&dwte), Some(B::whole(&dwpe)), B::whole(&dx), &idb, b, t, c);
    let g = host(&be, &dwte);
    assert!(g[2 * c..3 * c].iter().all(|&x| x == 0.0), "unused token row got a gradient");
    check("encoder dwte", &g, &(0..vp * c).collect::<Vec<_>>(), |i, h| {
        let mut x = wte.clone();
        x[i] += h;
        f(&x, &wpe)
    });
    check("encoder dwpe", &host(&be, &dwpe), &(0..t * c).collect::<Vec<_>>(), |i, h| {
        let mut x = wpe.clone();
        x[i] += h;
        f(&wte, &x)
    });
}

#[test]
fn crossentropy_gradient_matches_finite_differences_and_masks_padding() {
    let be = B::default();
    let mut rng = Rng::new(6);
    let (n, v, vp) = (3, 5, 8);
    let logits = randn(&mut rng, n * vp, 2.0);
    let targets = [0u32, 4, 2];
    let tb = be.alloc_ids(n);
    be.upload_ids(&tb, &targets);
    let f = |l: &[f32]| {
        let (lb, losses) = (buf(&be, l), be.alloc(n));
        be.crossentropy_forward_backward(B::whole(&lb), B::whole(&losses), &tb, 1.0, n, v, vp);
        host(&be, &losses).iter().map(|&x| x as f64).sum::<f64>()
    };
    let (lb, losses) = (buf(&be, &logits), be.alloc(n));
    be.crossentropy_forward_backward(B::whole(&lb), B::whole(&losses), &tb, 1.0, n, v, vp);
    let d = host(&be, &lb);
    for r in 0..n {
        assert!(d[r * vp + v..(r + 1) * vp].iter().all(|&x| x == 0.0), "padded logits got a gradient");
        // softmax-minus-onehot rows sum to zero
        assert!(d[r * vp..r * vp + v].iter().sum::<f32>().abs() < 1e-6);
    }
    // The loss must not depend on padded logits at all.
    let mut moved = logits.clone();
    moved[vp - 1] += 100.0;
    assert_eq!(f(&logits), f(&moved));
    let real: Vec<usize> = (0..n * vp).filter(|i| i % vp < v).collect();
    check("crossentropy dlogits", &d, &real, |i, h| {
        let mut x = logits.clone();
        x[i] += h;
        f(&x)
    });
}

// ------------------------------------------------------------------------------------------
// Whole model

fn tiny_dims() -> Dims {
    Dims::new(67, 8, 16, 2) // V=67 -> Vp=128: the padding is exercised
}

/// Push parameters away from init so every gradient is O(0.1) and nothing sits at a kink.
fn perturb(be: &B, set: &ParamSet<B>, rng: &mut Rng) {
    let mut p = set.params_to_host(be);
    for x in p.iter_mut() {
        *x += (rng.normal() * 0.3) as f32;
    }
    set.params_from_host(be, &p);
}

fn model_batch(be: &B, rng: &mut Rng, b: usize, t: usize, v: usize) -> Batch<B> {
    let windows: Vec<u32> = (0..b * (t + 1)).map(|_| rng.below(v as u64) as u32).collect();
    Batch::from_windows(be, &windows, b, t)
}

fn check_whole_model(depth: usize) {
    check_whole_model_with(depth, tiny_dims());
}

fn check_whole_model_with(depth: usize, dims: Dims) {
    let be = B::default();
    let mut rng = Rng::new(100 + depth as u64);
    let (b, t) = (2, 5);
    let mut model = Model::new(&be, dims.clone(), depth, &InitConfig::new(InitScheme::Gpt2, 2, 7));
    perturb(&be, &model.embed.w, &mut rng);
    perturb(&be, &model.head.w, &mut rng);
    for blk in &model.blocks {
        perturb(&be, &blk.w, &mut rng);
    }
    let batch = model_batch(&be, &mut rng, b, t, dims.vocab);
    model.zero_grad(&be);
    let n = (b * t) as f32;
    model.forward_backward(&be, &batch, 1.0 / n);
    model.finish_grads(&be);

    // Every parameter tensor of every unit.
    let mut units = vec![Unit::Embed, Unit::Head];
    units.extend((0..depth).map(Unit::Block));
    for u in units {
        let grads = unit(&model, u).grads_to_host(&be);
        let base = unit(&model, u).params_to_host(&be);
        for spec in unit(&model, u).layout.specs.clone() {
            // wte: sample rows of the real vocabulary (padded rows are zero and get no gradient);
            // being tied, its gradient is the embedding's share plus the head's.
            // The same for an untied lm_head's rows.
            let range = if matches!(spec.name.as_str(), "wte" | "lm_head") { dims.vocab * dims.channels } else { spec.numel() };
            let idx: Vec<usize> = (0..24).map(|_| spec.offset + rng.below(range as u64) as usize).collect();
            check(&format!("{depth} blocks: {u:?}.{}", spec.name), &grads, &idx, |i, h| {
                let mut p = base.clone();
                p[i] += h;
                unit(&model, u).params_from_host(&be, &p);
                let l = model.eval_loss(&be, &batch) as f64;
                unit(&model, u).params_from_host(&be, &base);
                l
            });
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Unit {
    Embed,
    Head,
    Block(usize),
}

fn unit(m: &Model<B>, u: Unit) -> &ParamSet<B> {
    match u {
        Unit::Embed => &m.embed.w,
        Unit::Head => &m.head.w,
        Unit::Block(i) => &m.blocks[i].w,
    }
}

#[test]
fn whole_model_gradients_0_blocks() {
    check_whole_model(0);
}

#[test]
fn whole_model_gradients_1_block() {
    check_whole_model(1);
}

#[test]
fn whole_model_gradients_with_a_residual_multiplier() {
    // depth-µP's branch multiplier (1/sqrt(L) for L = 4): the backward scales each branch's
    // gradient by it, and finite differences of the scaled forward agree.
    check_whole_model_with(2, tiny_dims().with_residual(0.5));
}

#[test]
fn whole_model_gradients_2_blocks() {
    check_whole_model(2);
}

/// A LLaMA shape at the tiny size: 4 query heads of 4 sharing 2 key/value heads, SwiGLU of 24.
fn tiny_llama() -> Dims {
    Dims::llama(67, 8, 16, 4, 2, 24)
}

#[test]
fn whole_model_gradients_llama_untied_head() {
    // Embedding without positions, RMSNorm head with its own lm_head, two LLaMA blocks.
    check_whole_model_with(2, tiny_llama());
}

#[test]
fn whole_model_gradients_llama_0_blocks_tied() {
    check_whole_model_with(0, tiny_llama().with_tied(true));
}

#[test]
fn whole_model_gradients_qwen3_tied_with_a_residual_multiplier() {
    // Head size 8 (2 query heads sharing 1 key/value head): at head size 4 the QK-norm is so
    // curved that the central difference's own O(h²) error reaches the tolerance.
    check_whole_model_with(2, Dims::llama(67, 8, 16, 2, 1, 24).with_arch(Arch::Qwen3).with_tied(true).with_residual(0.5));
}

/// The gradient with respect to the embedding output (the input of the block stack), checked by
/// perturbing that activation directly and running blocks and head from it.
#[test]
fn gradient_of_the_embedding_output_matches_finite_differences() {
    let be = B::default();
    let mut rng = Rng::new(9);
    let dims = tiny_dims();
    let (b, t) = (2, 5);
    let (n, c) = (b * t, dims.channels);
    let mut model = Model::new(&be, dims.clone(), 2, &InitConfig::new(InitScheme::Gpt2, 2, 3));
    // Unit-scale embeddings: at init scale (0.02) a step of h = 1e-2 would be a 50% change of
    // the LayerNorm input, and the finite difference would measure curvature, not slope.
    perturb(&be, &model.embed.w, &mut rng);
    for blk in &model.blocks {
        perturb(&be, &blk.w, &mut rng);
    }
    let batch = model_batch(&be, &mut rng, b, t, dims.vocab);
    let x0 = {
        let x = model.embed.forward(&be, &batch.inputs, b, t);
        let h = host(&be, &x);
        model.embed.recycle(&be, x);
        h
    };
    // Analytic: run blocks and head from x0 and take the gradient handed back to the embedding.
    let run = |model: &mut Model<B>, x0: &[f32], backward: bool| -> (f64, Vec<f32>) {
        let mut x = buf(&be, x0);
        for blk in model.blocks.iter_mut() {
            x = blk.forward(&be, 0, x, b, t);
        }
        if backward {
            let (mut dx, loss) = model.head.forward_backward(&be, 0, x, &batch.targets, &model.embed.w, 1.0 / n as f32, b, t);
            for blk in model.blocks.iter_mut().rev() {
                dx = blk.backward(&be, 0, dx);
            }
            (loss as f64, host(&be, &dx))
        } else {
            let (_, loss) = model.head.loss_only(&be, x, &batch.targets, &model.embed.w, b, t);
            for blk in model.blocks.iter_mut() {
                blk.forget(&be, 0);
            }
            (loss as f64, vec![])
        }
    };
    let (_, dx0) = run(&mut model, &x0, true);
    check("embedding output", &dx0, &(0..n * c).collect::<Vec<_>>(), |i, h| {
        let mut x = x0.clone();
        x[i] += h;
        run(&mut model, &x, false).0
    });
}

/// One block of `dims`' kind: finite differences on every tensor and the input, and a second
/// pass through the recycled buffers.
fn check_block(dims: &Dims, seed: u64) {
    check_block_mlp(dims, seed, Mlp::Dense);
}

fn check_block_mlp(dims: &Dims, seed: u64, mlp: Mlp) {
    let be = B::default();
    let mut rng = Rng::new(seed);
    let (b, t, c) = (2, 5, dims.channels);
    let layout = Block::<B>::layout_of(dims, mlp);
    let params: Vec<f32> = layout
        .specs
        .iter()
        .flat_map(|s| {
            let v = randn(&mut rng, s.numel(), if s.is_matrix() { 0.4 } else { 0.2 });
            if s.is_matrix() {
                v
            } else {
                v.iter().map(|x| 1.0 + x).collect()
            }
        })
        .collect();
    let x = randn(&mut rng, b * t * c, 1.0);
    let r = randn(&mut rng, b * t * c, 1.0);
    let loss = |params: &[f32], x: &[f32]| {
        let mut blk = Block::new_empty_mlp(&be, dims, 0, mlp);
        blk.w.params_from_host(&be, params);
        let y = blk.forward(&be, 0, buf(&be, x), b, t);
        // The objective the backward differentiates: the output against r, and the MoE
        // balancing loss (0 unless the test sets its weight).
        dot(&host(&be, &y), &r) + blk.last_aux_loss() as f64
    };
    let mut blk = Block::new_empty_mlp(&be, dims, 0, mlp);
    blk.w.params_from_host(&be, &params);
    let _ = blk.forward(&be, 7, buf(&be, &x), b, t);
    let dx = host(&be, &blk.backward(&be, 7, buf(&be, &r)));
    let grads = blk.w.grads_to_host(&be);
    // Again on the same block, through its recycled buffers: the same dx bitwise, and the
    // parameter gradients accumulated to twice (to rounding: the products add into the sum).
    let _ = blk.forward(&be, 8, buf(&be, &x), b, t);
    assert_eq!(host(&be, &blk.backward(&be, 8, buf(&be, &r))), dx);
    for (g2, g) in blk.w.grads_to_host(&be).iter().zip(&grads) {
        assert!((g2 - 2.0 * g).abs() <= 1e-5 * (1.0 + g.abs()), "{g2} against 2 × {g}");
    }
    let kind = format!("{}{}", dims.arch.name(), if mlp == Mlp::Moe { " moe" } else { "" });
    check(&format!("{kind} block dx"), &dx, &(0..x.len()).collect::<Vec<_>>(), |i, h| {
        let mut v = x.clone();
        v[i] += h;
        loss(&params, &v)
    });
    for spec in &layout.specs {
        let idx: Vec<usize> = (spec.offset..spec.offset + spec.numel()).collect();
        if spec.name == "router_bias" {
            // It only steers the selection, which is piecewise constant: no gradient, and the
            // loss does not move under a small change of it.
            assert!(idx.iter().all(|&i| grads[i] == 0.0), "{kind}: router_bias has a gradient");
            for &i in &idx {
                let mut v = params.clone();
                v[i] += H;
                assert_eq!(loss(&v, &x), loss(&params, &x), "{kind}: router_bias moved the loss");
            }
            continue;
        }
        check(&format!("{kind} block {}", spec.name), &grads, &idx, |i, h| {
            let mut v = params.clone();
            v[i] += h;
            loss(&v, &x)
        });
    }
}

#[test]
fn llama_block_gradients_match_finite_differences() {
    // 4 query heads of 2 sharing 2 key/value heads, SwiGLU of 12: every op of the block kind.
    check_block(&Dims::llama(67, 8, 8, 4, 2, 12), 25);
}

#[test]
fn qwen3_block_gradients_match_finite_differences() {
    // QK-norm on top, and a residual multiplier: q_norm, k_norm and α's backward too.
    check_block(&Dims::llama(67, 8, 16, 4, 2, 12).with_arch(Arch::Qwen3).with_residual(0.5), 26);
}

fn moe(routing: Routing, shared: usize) -> Moe {
    Moe { experts: 4, top_k: 2, shared, hidden: 6, routing, bias_rate: 0.001, first_dense: 0, aux: 0.0 }
}

#[test]
fn moe_block_gradients_with_the_auxiliary_balancing_loss_match_finite_differences() {
    // The balancing loss's gradient through the softmax and through the normalised sigmoids,
    // at a weight large enough to matter beside the output's (0.5).
    for (routing, seed) in [(Routing::Softmax, 30), (Routing::Sigmoid, 31)] {
        let d = Dims::llama(67, 8, 8, 4, 2, 12).with_moe(Moe { aux: 0.5, ..moe(routing, 0) });
        check_block_mlp(&d, seed, Mlp::Moe);
    }
}

#[test]
fn moe_block_gradients_match_finite_differences_softmax_routing_with_shared_experts() {
    // 4 experts, 2 per token, renormalised softmax weights, one shared expert, α = 0.5: every
    // expert matrix, the router and the shared expert against finite differences. The selection
    // is piecewise constant; this seed's margins keep every perturbation on one side of it.
    let d = Dims::llama(67, 8, 8, 4, 2, 12).with_residual(0.5).with_moe(moe(Routing::Softmax, 1));
    check_block_mlp(&d, 30, Mlp::Moe);
}

#[test]
fn moe_block_gradients_match_finite_differences_sigmoid_routing_qwen3() {
    let d = Dims::llama(67, 8, 8, 4, 2, 12).with_arch(Arch::Qwen3).with_moe(moe(Routing::Sigmoid, 0));
    check_block_mlp(&d, 31, Mlp::Moe);
}

#[test]
fn gpt2_block_gradients_match_finite_differences() {
    check_block(&Dims::new(67, 8, 8, 2).with_residual(0.5), 27);
}

#[test]
fn head_rmsnorm_backward_matches_finite_differences() {
    // Rows of 2 heads of 4 plus 5 floats the op must not touch; the gradient is in place.
    let be = B::default();
    let mut rng = Rng::new(28);
    let (rows, heads, hd, stride) = (3, 2, 4, 2 * 4 + 5);
    let x = randn(&mut rng, rows * stride, 1.0);
    let wv: Vec<f32> = randn(&mut rng, hd, 0.3).iter().map(|v| 1.0 + v).collect();
    let r = randn(&mut rng, rows * stride, 1.0);
    let fwd = |x: &[f32], wv: &[f32]| {
        let (out, rstd) = (buf(&be, &vec![7.0; rows * stride]), be.alloc(rows * heads));
        be.head_rmsnorm_forward(
            B::whole(&out),
            B::whole(&rstd),
            B::whole(&buf(&be, x)),
            B::whole(&buf(&be, wv)),
            rows,
            stride,
            heads,
            hd,
            1e-6,
        );
        (host(&be, &out), rstd)
    };
    let (y, rstd) = fwd(&x, &wv);
    for row in 0..rows {
        assert!(y[row * stride + heads * hd..(row + 1) * stride].iter().all(|&v| v == 7.0), "only the head vectors are written");
        let h0 = &y[row * stride..row * stride + hd];
        let ms: f32 = h0.iter().zip(&wv).map(|(v, w)| (v / w) * (v / w)).sum::<f32>() / hd as f32;
        assert!((ms - 1.0).abs() < 1e-4, "a normed head has unit mean square before its gain: {ms}");
    }
    let loss = |x: &[f32], wv: &[f32]| {
        let (y, _) = fwd(x, wv);
        // Only the head vectors count (the rest of `out` is left as it was).
        (0..rows).flat_map(|row| row * stride..row * stride + heads * hd).map(|i| y[i] as f64 * r[i] as f64).sum::<f64>()
    };
    let d = buf(&be, &r);
    let dw = be.alloc(hd);
    be.head_rmsnorm_backward(
        B::whole(&d),
        B::whole(&dw),
        B::whole(&buf(&be, &x)),
        B::whole(&buf(&be, &wv)),
        B::whole(&rstd),
        rows,
        stride,
        heads,
        hd,
    );
    let dx = host(&be, &d);
    for row in 0..rows {
        let tail = row * stride + heads * hd..(row + 1) * stride;
        assert_eq!(&dx[tail.clone()], &r[tail], "the other floats of a row are left alone");
    }
    let heads_idx: Vec<usize> = (0..rows).flat_map(|row| row * stride..row * stride + heads * hd).collect();
    check("head rmsnorm dinp", &dx, &heads_idx, |i, h| {
        let mut v = x.clone();
        v[i] += h;
        loss(&v, &wv)
    });
    check("head rmsnorm dw", &host(&be, &dw), &(0..hd).collect::<Vec<_>>(), |i, h| {
        let mut v = wv.clone();
        v[i] += h;
        loss(&x, &v)
    });
}
