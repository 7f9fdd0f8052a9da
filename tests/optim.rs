//! Optimizer checks against docs/METHOD.md: Newton–Schulz orthogonalisation, one step of every
//! optimizer kind against a host f64 reference and hand arithmetic, rule assignment per tensor,
//! weight decay on matrices only, per-tensor step counters, and `OptState` reset/copy.
//!
//! Tolerances: the backend computes in f32, the references in f64. Elementwise rules (AdamW,
//! NSGD, the final Muon apply) agree to ~1e-7 relative, and we assert 1e-5 relative (with an
//! absolute floor of 1e-6). Newton–Schulz runs 5 rounds of f32 matrix products whose rounding
//! is amplified by up to a = 3.4445 per round on small singular directions, so its output is
//! compared with an absolute tolerance of 1e-5 (entries are O(1/sqrt(max(r, c))) ≈ 0.1–0.2).

use taproot::backend::cpu::CpuBackend;
use taproot::backend::{Backend, View};
use taproot::optim::adamw::adamw_reference;
use taproot::optim::muon::{muon_reference, newton_schulz, newton_schulz_reference};
use taproot::optim::{EmbeddingOptimizer, OptimConfig, Optimizer, OptimizerKind, Rule, Scratch};
use taproot::params::{Layout, OptState, ParamSet};
use taproot::rng::Rng;

mod common;

use common::{buf, host, randn};

type B = CpuBackend;

const COEFFS: [f32; 3] = [3.4445, -4.7750, 2.0315];
/// Relative tolerance for f32-vs-f64 elementwise comparisons.
const REL: f64 = 1e-5;
/// Absolute tolerance for Newton–Schulz outputs (f32 vs f64, 5 rounds; observed ≤ 7.6e-7).
const NS_ABS: f64 = 1e-5;

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Assert |a - b| <= rel * max(1, |b|) elementwise (a: backend f32, b: reference f64).
fn assert_close(what: &str, a: &[f32], b: &[f64], rel: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let err = (x as f64 - y).abs();
        assert!(err <= rel * y.abs().max(1.0), "{what}[{i}]: got {x}, want {y} (err {err:.3e})");
    }
}

/// Eigenvalues of a symmetric n×n matrix (row-major, f64) by cyclic Jacobi rotations.
fn sym_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    for _sweep in 0..100 {
        let off: f64 = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| a[i * n + j].powi(2)).sum();
        let diag: f64 = (0..n).map(|i| a[i * n + i].powi(2)).sum();
        if off <= 1e-30 * diag.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (a[p * n + p], a[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A <- Jᵀ A J with the rotation in the (p, q) plane.
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..n).map(|i| a[i * n + i]).collect()
}

/// Singular values of an (r, c) matrix: square roots of the eigenvalues of the smaller Gram
/// matrix (X Xᵀ for wide, Xᵀ X for tall).
fn singular_values(x: &[f64], r: usize, c: usize) -> Vec<f64> {
    let k = r.min(c);
    let mut g = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            g[i * k + j] =
                if r <= c { (0..c).map(|l| x[i * c + l] * x[j * c + l]).sum() } else { (0..r).map(|l| x[l * c + i] * x[l * c + j]).sum() };
        }
    }
    sym_eigenvalues(g, k).into_iter().map(|e| e.max(0.0).sqrt()).collect()
}

#[test]
fn jacobi_singular_values_of_a_known_matrix() {
    // diag(3, 2) padded to 2x3 (wide) and its transpose (tall): singular values {3, 2}.
    let wide = [3.0, 0.0, 0.0, 0.0, 2.0, 0.0];
    let tall = [3.0, 0.0, 0.0, 2.0, 0.0, 0.0];
    for (x, r, c) in [(&wide, 2, 3), (&tall, 3, 2)] {
        let mut s = singular_values(x, r, c);
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert!((s[0] - 2.0).abs() < 1e-12 && (s[1] - 3.0).abs() < 1e-12, "{s:?}");
    }
    // A rotation times diag(1, 0.5): singular values {1, 0.5}, off-diagonal Gram entries.
    let (co, si) = (0.6f64, 0.8f64);
    let x = [co * 1.0, -si * 0.5, si * 1.0, co * 0.5];
    let mut s = singular_values(&x, 2, 2);
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert!((s[0] - 0.5).abs() < 1e-12 && (s[1] - 1.0).abs() < 1e-12, "{s:?}");
}

/// Newton–Schulz (backend, 5 steps, docs/METHOD.md coefficients) on random Frobenius-normalised
/// Gaussian matrices. Observed with seed 7 (input min singular value -> output range):
///   16x48   0.1275 -> [0.6821, 1.1327]
///   32x32   0.0045 -> [0.6822, 1.1940]
///   64x24   0.0950 -> [0.6828, 1.0882]
///   128x32  0.0926 -> [0.6818, 1.0440]
/// all inside the asserted band [0.5, 1.5] (the quintic is tuned to land in roughly
/// [0.68, 1.2] rather than converge to 1). Max |backend − f64 reference| observed ≤ 7.6e-7.
#[test]
fn newton_schulz_singular_values_in_band_and_match_reference() {
    let be = B::default();
    let mut rng = Rng::new(7);
    for (r, c) in [(16, 48), (32, 32), (64, 24), (128, 32)] {
        let n = r * c;
        let k = r.min(c);
        let raw = randn(&mut rng, n, 1.0);
        let norm = raw.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let x0: Vec<f32> = raw.iter().map(|&v| (v as f64 / norm) as f32).collect();
        // Input singular values, to show Newton–Schulz did the work.
        let sv_in = singular_values(&f64s(&x0), r, c);
        let in_min = sv_in.iter().cloned().fold(f64::INFINITY, f64::min);

        let (x, x2, a, bm) = (buf(&be, &x0), be.alloc(n), be.alloc(k * k), be.alloc(k * k));
        let in_x2 = newton_schulz(&be, B::whole(&x), B::whole(&x2), B::whole(&a), B::whole(&bm), r, c, 5, COEFFS);
        assert!(in_x2, "5 steps (odd) must leave the result in x2");
        let out = host(&be, if in_x2 { &x2 } else { &x });

        let sv = singular_values(&f64s(&out), r, c);
        let (lo, hi) = sv.iter().fold((f64::INFINITY, 0.0f64), |(l, h), &s| (l.min(s), h.max(s)));
        eprintln!("NS {r}x{c}: input sv min {in_min:.4}, output sv in [{lo:.4}, {hi:.4}]");
        assert_eq!(sv.len(), k);
        assert!(lo >= 0.5 && hi <= 1.5, "{r}x{c}: singular values in [{lo}, {hi}], want within [0.5, 1.5]");
        assert!(in_min < 0.5, "{r}x{c}: the input should start far from orthogonal (min sv {in_min})");

        let reference = newton_schulz_reference(&f64s(&x0), r, c, 5, COEFFS.map(|v| v as f64));
        let max_err = out.iter().zip(&reference).map(|(&o, &e)| (o as f64 - e).abs()).fold(0.0, f64::max);
        eprintln!("NS {r}x{c}: max |backend - reference| = {max_err:.3e}");
        assert!(max_err <= NS_ABS, "{r}x{c}: backend vs reference max abs error {max_err:.3e} > {NS_ABS:e}");
    }
}

/// A tiny unit: a wide (3, 5) matrix, a tall (5, 3) matrix, a (5) vector.
fn tiny_set(be: &B) -> ParamSet<B> {
    ParamSet::new(be, Layout::new(&[("w", vec![3, 5]), ("t", vec![5, 3]), ("b", vec![5])]))
}

fn upload_grads(be: &B, set: &ParamSet<B>, g: &[f32]) {
    be.upload(B::whole(&set.grads), g);
}

fn slice<'a, T>(set: &ParamSet<B>, name: &str, all: &'a [T]) -> &'a [T] {
    let s = set.layout.get(name);
    &all[s.offset..s.offset + s.numel()]
}

fn s_rows(set: &ParamSet<B>, name: &str) -> f64 {
    set.layout.get(name).rows() as f64
}

fn s_cols(set: &ParamSet<B>, name: &str) -> f64 {
    set.layout.get(name).cols() as f64
}

fn cfg(kind: OptimizerKind) -> OptimConfig {
    OptimConfig { kind, ..OptimConfig::default() }
}

#[test]
fn defaults_are_methods() {
    let c = OptimConfig::default();
    assert_eq!(c.kind, OptimizerKind::MuonNsgd);
    assert_eq!(c.momentum, 0.95);
    assert!(c.nesterov);
    assert_eq!(c.ns_steps, 5);
    assert_eq!(c.ns_coeffs, COEFFS);
    assert_eq!((c.beta1, c.beta2, c.eps), (0.9, 0.95, 1e-8));
    assert_eq!(c.embedding_optimizer, EmbeddingOptimizer::Muon);
    assert_eq!(cfg(OptimizerKind::MuonNsgd).weight_decay(), 0.01);
    assert_eq!(cfg(OptimizerKind::Adamw).weight_decay(), 0.1);
}

#[test]
fn adamw_two_steps_match_reference_and_hand_arithmetic() {
    let be = B::default();
    let mut set = tiny_set(&be);
    let opt = Optimizer::new(cfg(OptimizerKind::Adamw));
    let mut scratch = Scratch::default();
    let lr = 0.01f32;
    let mut rng = Rng::new(3);
    let n = set.numel();
    let mut p0 = randn(&mut rng, n, 1.0);
    let mut g1 = randn(&mut rng, n, 0.3);
    let mut g2 = randn(&mut rng, n, 0.3);
    // The hand-checked elements: w[0] (a matrix: decays) and b[0] (a vector: no decay).
    let (w0, b0) = (set.layout.get("w").offset, set.layout.get("b").offset);
    for i in [w0, b0] {
        p0[i] = 0.5;
        g1[i] = 0.2;
        g2[i] = -0.1;
    }
    set.params_from_host(&be, &p0);

    // f64 reference state.
    let mut p = f64s(&p0);
    let mut m = vec![0.0f64; n];
    let mut v = vec![0.0f64; n];
    for (t, g) in [(1u64, &g1), (2, &g2)] {
        upload_grads(&be, &set, g);
        opt.step(&be, &mut set, &mut scratch, lr);
        for spec in &set.layout.specs {
            let r = spec.offset..spec.offset + spec.numel();
            let wd = if spec.is_matrix() { 0.1 } else { 0.0 };
            adamw_reference(&mut p[r.clone()], &f64s(&g[r.clone()]), &mut m[r.clone()], &mut v[r], lr as f64, 0.9, 0.95, 1e-8, wd, t);
        }
        assert_close(&format!("adamw params after step {t}"), &set.params_to_host(&be), &p, REL);
        assert_close(&format!("adamw m after step {t}"), &host(&be, &set.state.m), &m, REL);
        assert_close(&format!("adamw v after step {t}"), &host(&be, set.state.v.as_ref().unwrap()), &v, REL);
        if t == 1 {
            // Hand arithmetic, step 1 (lr 0.01, β = (0.9, 0.95), p = 0.5, g = 0.2):
            //   m = 0.1·0.2 = 0.02, v = 0.05·0.04 = 0.002, m̂ = 0.02/0.1 = 0.2, v̂ = 0.002/0.05 = 0.04
            //   m̂/(√v̂ + ε) = 0.2/0.2 ≈ 0.99999995
            //   w: p = 0.5 − 0.01·(0.99999995 + 0.1·0.5) = 0.4895000005
            //   b: p = 0.5 − 0.01·0.99999995            = 0.4900000005
            let ph = set.params_to_host(&be);
            assert!((ph[w0] as f64 - 0.4895000005).abs() < 1e-6, "w[0] after step 1: {}", ph[w0]);
            assert!((ph[b0] as f64 - 0.4900000005).abs() < 1e-6, "b[0] after step 1: {}", ph[b0]);
        }
    }
    // Hand arithmetic, step 2 (g = −0.1):
    //   m = 0.9·0.02 + 0.1·(−0.1) = 0.008, v = 0.95·0.002 + 0.05·0.01 = 0.0024
    //   m̂ = 0.008/(1 − 0.81) = 0.0421052632, v̂ = 0.0024/(1 − 0.9025) = 0.0246153846
    //   m̂/(√v̂ + ε) = 0.0421052632/0.1568929081 = 0.2683694310
    //   w: p = 0.4895000005 − 0.01·(0.2683694310 + 0.1·0.4895000005) = 0.4863268062
    //   b: p = 0.4900000005 − 0.01·0.2683694310                      = 0.4873163062
    let ph = set.params_to_host(&be);
    assert!((ph[w0] as f64 - 0.4863268062).abs() < 1e-6, "w[0] after step 2: {}", ph[w0]);
    assert!((ph[b0] as f64 - 0.4873163062).abs() < 1e-6, "b[0] after step 2: {}", ph[b0]);
    let mh = host(&be, &set.state.m);
    let vh = host(&be, set.state.v.as_ref().unwrap());
    assert!((mh[w0] as f64 - 0.008).abs() < 1e-8 && (vh[w0] as f64 - 0.0024).abs() < 1e-9);
    assert_eq!(set.state.steps, vec![2, 2, 2]);
}

#[test]
fn muon_nsgd_two_steps_match_reference_and_hand_nsgd() {
    let be = B::default();
    let mut set = tiny_set(&be);
    let c = cfg(OptimizerKind::MuonNsgd);
    assert_eq!(c.rule(set.layout.get("w")), Rule::Muon);
    assert_eq!(c.rule(set.layout.get("t")), Rule::Muon);
    assert_eq!(c.rule(set.layout.get("b")), Rule::Nsgd);
    let opt = Optimizer::new(c.clone());
    let mut scratch = Scratch::default();
    let lr = 0.02f32;
    let mut rng = Rng::new(5);
    let n = set.numel();
    let p0 = randn(&mut rng, n, 1.0);
    let mut g1 = randn(&mut rng, n, 1.0);
    let mut g2 = randn(&mut rng, n, 1.0);
    // The vector's gradients are chosen for round numbers: m1 = (3, 4, 0, 0, 0), ‖m1‖ = 5;
    // m2 = 0.95·m1 + (0.15, 0.2, 0, 0, 12) = (3, 4, 0, 0, 12), ‖m2‖ = 13.
    let bo = set.layout.get("b").offset;
    g1[bo..bo + 5].copy_from_slice(&[3.0, 4.0, 0.0, 0.0, 0.0]);
    g2[bo..bo + 5].copy_from_slice(&[0.15, 0.2, 0.0, 0.0, 12.0]);
    set.params_from_host(&be, &p0);

    let mut p = f64s(&p0);
    let mut m = vec![0.0f64; n];
    for (step, g) in [(1, &g1), (2, &g2)] {
        upload_grads(&be, &set, g);
        opt.step(&be, &mut set, &mut scratch, lr);
        for name in ["w", "t"] {
            let s = set.layout.get(name);
            let r = s.offset..s.offset + s.numel();
            muon_reference(&mut p[r.clone()], &f64s(&g[r.clone()]), &mut m[r], s.rows(), s.cols(), &c, lr as f64, 0.01);
        }
        let ph = set.params_to_host(&be);
        for name in ["w", "t"] {
            // Through Newton–Schulz: the NS tolerance scaled by lr·max(1, r/c)^0.5, plus f32
            // rounding of O(1) parameters over two steps.
            let tol = NS_ABS * lr as f64 * (s_rows(&set, name) / s_cols(&set, name)).max(1.0).sqrt() + 1e-6;
            let got = slice(&set, name, &ph);
            let want = slice(&set, name, &p);
            let err = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(err <= tol, "muon {name} after step {step}: max abs error {err:.3e} > {tol:.3e}");
        }
        // NSGD on the vector, by hand: plain momentum, p -= lr·m/‖m‖, no weight decay.
        let want: Vec<f64> = match step {
            1 => [0.6, 0.8, 0.0, 0.0, 0.0].iter().enumerate().map(|(i, d)| p0[bo + i] as f64 - 0.02 * d).collect(),
            _ => {
                let d1 = [0.6, 0.8, 0.0, 0.0, 0.0];
                let d2 = [3.0 / 13.0, 4.0 / 13.0, 0.0, 0.0, 12.0 / 13.0];
                (0..5).map(|i| p0[bo + i] as f64 - 0.02 * d1[i] - 0.02 * d2[i]).collect()
            }
        };
        assert_close(&format!("nsgd b after step {step}"), slice(&set, "b", &ph), &want, REL);
        // Entries with zero gradient so far did not move at all: no decay on a vector.
        if step == 1 {
            assert_eq!(&ph[bo + 2..bo + 5], &p0[bo + 2..bo + 5]);
        }
        let mh = host(&be, &set.state.m);
        let m_b: [f32; 5] = if step == 1 { [3.0, 4.0, 0.0, 0.0, 0.0] } else { [3.0, 4.0, 0.0, 0.0, 12.0] };
        assert_close("nsgd momentum", &mh[bo..bo + 5], &f64s(&m_b), REL);
        assert_close("muon momentum", &mh[..bo], &m[..bo], REL);
    }
    assert_eq!(set.state.steps, vec![2, 2, 2]);
    assert!(set.state.v.is_none(), "muon_nsgd never allocates a second moment");
}

#[test]
fn muon_update_scale_is_sqrt_rows_over_cols_for_tall_matrices() {
    // One step from p = 0 (so decay contributes nothing): Δp = −lr·scale·NS(x). The same
    // gradient transposed gives the transposed NS output; the tall one's step is (5/3)^0.5 larger.
    let be = B::default();
    let mut set = tiny_set(&be);
    let opt = Optimizer::new(cfg(OptimizerKind::MuonNsgd));
    let mut rng = Rng::new(11);
    let gw = randn(&mut rng, 15, 1.0);
    let mut g = vec![0.0f32; set.numel()];
    let (wo, to) = (set.layout.get("w").offset, set.layout.get("t").offset);
    g[wo..wo + 15].copy_from_slice(&gw);
    for i in 0..3 {
        for j in 0..5 {
            g[to + j * 3 + i] = gw[i * 5 + j];
        }
    }
    upload_grads(&be, &set, &g);
    opt.step(&be, &mut set, &mut Scratch::default(), 0.1);
    let ph = set.params_to_host(&be);
    let scale = (5.0f64 / 3.0).sqrt();
    for i in 0..3 {
        for j in 0..5 {
            let (w, t) = (ph[wo + i * 5 + j] as f64, ph[to + j * 3 + i] as f64);
            assert!((t - scale * w).abs() <= 1e-5, "t[{j},{i}] = {t}, want {scale}·{w}");
        }
    }
}

#[test]
fn weight_decay_on_matrices_only_for_every_kind() {
    // With a zero gradient every rule's update direction is 0 (Muon: 0/(0 + 1e-7) = 0; NSGD:
    // 0/(0 + 1e-8); AdamW: 0/(0 + ε)), so a step is pure decoupled decay: a matrix scales by
    // (1 − lr·wd), a vector does not move.
    let be = B::default();
    let lr = 0.5f32;
    for (kind, wd) in [(OptimizerKind::MuonNsgd, 0.01f32), (OptimizerKind::Adamw, 0.1), (OptimizerKind::MuonAdamw, 0.1)] {
        let mut set = tiny_set(&be);
        let p0: Vec<f32> = (0..set.numel()).map(|i| 1.0 + i as f32 * 0.25).collect();
        set.params_from_host(&be, &p0);
        Optimizer::new(cfg(kind)).step(&be, &mut set, &mut Scratch::default(), lr);
        let ph = set.params_to_host(&be);
        let keep = 1.0 - lr as f64 * wd as f64;
        for name in ["w", "t"] {
            let want: Vec<f64> = slice(&set, name, &p0).iter().map(|&v| v as f64 * keep).collect();
            assert_close(&format!("{kind:?} decay of matrix {name}"), slice(&set, name, &ph), &want, REL);
        }
        assert_eq!(slice(&set, "b", &ph), slice(&set, "b", &p0), "{kind:?}: a vector must not decay");
    }
}

/// An embedding unit and a block-like unit's tensors in one layout.
fn mixed_layout() -> Layout {
    Layout::new(&[("wte", vec![8, 4]), ("wpe", vec![6, 4]), ("qkvw", vec![12, 4]), ("ln1w", vec![4]), ("qkvb", vec![12])])
}

#[test]
fn rule_assignment_per_kind() {
    let l = mixed_layout();
    assert!(l.get("wte").is_embedding);
    let rules = |c: &OptimConfig| l.specs.iter().map(|s| c.rule(s)).collect::<Vec<_>>();
    use Rule::*;
    // muon_adamw: Muon on block matrices only; AdamW on both embeddings, gains and biases.
    assert_eq!(rules(&cfg(OptimizerKind::MuonAdamw)), vec![AdamW, AdamW, Muon, AdamW, AdamW]);
    // adamw: everywhere.
    assert_eq!(rules(&cfg(OptimizerKind::Adamw)), vec![AdamW; 5]);
    // muon_nsgd: embeddings follow embedding_optimizer (default muon).
    assert_eq!(rules(&cfg(OptimizerKind::MuonNsgd)), vec![Muon, Muon, Muon, Nsgd, Nsgd]);
    let nsgd_emb = OptimConfig { embedding_optimizer: EmbeddingOptimizer::Nsgd, ..OptimConfig::default() };
    assert_eq!(rules(&nsgd_emb), vec![Nsgd, Nsgd, Muon, Nsgd, Nsgd]);
}

#[test]
fn muon_adamw_step_applies_each_rule() {
    let be = B::default();
    let mut set = ParamSet::new(&be, mixed_layout());
    let c = OptimConfig { kind: OptimizerKind::MuonAdamw, adam_lr_scale: 0.5, ..OptimConfig::default() };
    let opt = Optimizer::new(c.clone());
    let lr = 0.01f32;
    let mut rng = Rng::new(13);
    let n = set.numel();
    let p0 = randn(&mut rng, n, 1.0);
    // Gradients bounded away from 0, so AdamW's first step is m̂/√v̂ = sign(g) to ~1e-7.
    let g: Vec<f32> = randn(&mut rng, n, 1.0).iter().map(|&v| if v >= 0.0 { v + 0.1 } else { v - 0.1 }).collect();
    set.params_from_host(&be, &p0);
    upload_grads(&be, &set, &g);
    opt.step(&be, &mut set, &mut Scratch::default(), lr);
    assert!(set.state.v.is_some(), "AdamW tensors allocate the second moment");
    let ph = set.params_to_host(&be);
    let adam_lr = (lr * 0.5) as f64; // adam_lr_scale applies to the AdamW tensors
    for name in ["wte", "wpe", "ln1w", "qkvb"] {
        let s = set.layout.get(name);
        let wd = if s.is_matrix() { 0.1 } else { 0.0 };
        let want: Vec<f64> =
            (s.offset..s.offset + s.numel()).map(|i| p0[i] as f64 - adam_lr * ((g[i] as f64).signum() + wd * p0[i] as f64)).collect();
        assert_close(&format!("muon_adamw AdamW tensor {name}"), slice(&set, name, &ph), &want, REL);
    }
    // The block matrix got Muon at the full lr (and wd 0.1, the kind's coefficient).
    let s = set.layout.get("qkvw");
    let r = s.offset..s.offset + s.numel();
    let mut p = f64s(&p0[r.clone()]);
    let mut m = vec![0.0; s.numel()];
    muon_reference(&mut p, &f64s(&g[r]), &mut m, s.rows(), s.cols(), &c, lr as f64, 0.1);
    let err = slice(&set, "qkvw", &ph).iter().zip(&p).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
    let tol = NS_ABS * lr as f64 * 3f64.sqrt() + 1e-6; // qkvw is (12, 4): scale √3
    assert!(err <= tol, "muon_adamw Muon tensor qkvw: max abs error {err:.3e} > {tol:.3e}");
}

#[test]
fn step_counters_are_per_tensor_and_start_at_one_for_a_newborn() {
    let be = B::default();
    let opt = Optimizer::new(cfg(OptimizerKind::Adamw));
    let mut scratch = Scratch::default();
    let lr = 0.01f32;
    let mut rng = Rng::new(17);
    let mut set = tiny_set(&be);
    let n = set.numel();
    let k = 4;
    for _ in 0..k {
        upload_grads(&be, &set, &randn(&mut rng, n, 1.0));
        opt.step(&be, &mut set, &mut scratch, lr);
    }
    assert_eq!(set.state.steps, vec![k; 3], "after {k} steps every tensor has taken {k}");

    // A newborn unit's state starts at 0, and its first AdamW update uses bias correction of
    // step 1: with m̂ = g, v̂ = g², the update of a vector entry is exactly −lr·sign(g).
    let fresh: OptState<B> = OptState::new(&be, &set.layout);
    assert_eq!(fresh.steps, vec![0; 3]);
    assert!(fresh.v.is_none());
    assert!(host(&be, &fresh.m).iter().all(|&x| x == 0.0));
    let mut born = tiny_set(&be);
    let p0 = randn(&mut rng, n, 1.0);
    let g: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 0.3 } else { -0.7 }).collect();
    born.params_from_host(&be, &p0);
    upload_grads(&be, &born, &g);
    opt.step(&be, &mut born, &mut scratch, lr);
    assert_eq!(born.state.steps, vec![1; 3]);
    let ph = born.params_to_host(&be);
    let bo = born.layout.get("b").offset;
    for i in bo..n {
        let d = (ph[i] - p0[i]) as f64;
        // Bias-corrected at step 5 instead it would be (0.1/(1−0.9⁵))/√(0.05/(1−0.95⁵)) ≈ 0.52,
        // and uncorrected √0.2 ≈ 0.45: either is far outside this 1e-6 tolerance.
        assert!((d + lr as f64 * (g[i] as f64).signum()).abs() < 1e-6, "b[{}]: Δ = {d}, want ∓{lr}", i - bo);
    }

    // Within one unit, each tensor corrects with its own count: pretend "b" was just inserted
    // (counter 0, zero moments) while "w" and "t" continue at step k + 1.
    let bspec = set.layout.get("b").clone();
    let bi = set.layout.index("b");
    be.fill(View::new(&set.state.m, bspec.offset, 5), 0.0);
    be.fill(View::new(set.state.v.as_ref().unwrap(), bspec.offset, 5), 0.0);
    set.state.steps[bi] = 0;
    let before = set.params_to_host(&be);
    let m_before = f64s(&host(&be, &set.state.m));
    let v_before = f64s(&host(&be, set.state.v.as_ref().unwrap()));
    upload_grads(&be, &set, &g);
    opt.step(&be, &mut set, &mut scratch, lr);
    assert_eq!(set.state.steps, vec![k + 1, k + 1, 1]);
    let after = set.params_to_host(&be);
    let mut p = f64s(&before);
    let (mut m, mut v) = (m_before, v_before);
    for (i, spec) in set.layout.specs.iter().enumerate() {
        let r = spec.offset..spec.offset + spec.numel();
        let wd = if spec.is_matrix() { 0.1 } else { 0.0 };
        let t = [k + 1, k + 1, 1][i];
        adamw_reference(&mut p[r.clone()], &f64s(&g[r.clone()]), &mut m[r.clone()], &mut v[r], lr as f64, 0.9, 0.95, 1e-8, wd, t);
    }
    assert_close("mixed step counters", &after, &p, REL);
    for i in bspec.offset..n {
        assert!(((after[i] - before[i]) as f64 + lr as f64 * (g[i] as f64).signum()).abs() < 1e-6);
    }
}

#[test]
fn optstate_reset_and_copy_from() {
    let be = B::default();
    let opt = Optimizer::new(cfg(OptimizerKind::Adamw));
    let mut scratch = Scratch::default();
    let mut rng = Rng::new(19);
    let mut src = tiny_set(&be);
    let n = src.numel();
    for _ in 0..3 {
        upload_grads(&be, &src, &randn(&mut rng, n, 1.0));
        opt.step(&be, &mut src, &mut scratch, 0.01);
    }
    assert!(host(&be, &src.state.m).iter().any(|&x| x != 0.0));

    // copy_from into a fresh state (no v yet): m, v and steps all arrive.
    let mut dst = tiny_set(&be);
    dst.state.copy_from(&be, &src.state);
    assert_eq!(dst.state.steps, vec![3; 3]);
    assert_eq!(host(&be, &dst.state.m), host(&be, &src.state.m));
    assert_eq!(host(&be, dst.state.v.as_ref().unwrap()), host(&be, src.state.v.as_ref().unwrap()));
    // ... and the copy behaves identically from there on.
    let p = randn(&mut rng, n, 1.0);
    let g = randn(&mut rng, n, 1.0);
    for s in [&mut src, &mut dst] {
        s.params_from_host(&be, &p);
        upload_grads(&be, s, &g);
        opt.step(&be, s, &mut scratch, 0.01);
    }
    assert_eq!(src.params_to_host(&be), dst.params_to_host(&be));

    // copy_from a state without v into one with v zeroes the destination's v.
    let muon_only = tiny_set(&be);
    dst.state.copy_from(&be, &muon_only.state);
    assert_eq!(dst.state.steps, vec![0; 3]);
    assert!(host(&be, &dst.state.m).iter().all(|&x| x == 0.0));
    assert!(host(&be, dst.state.v.as_ref().unwrap()).iter().all(|&x| x == 0.0));

    // reset zeroes every moment and step counter.
    src.state.reset(&be);
    assert_eq!(src.state.steps, vec![0; 3]);
    assert!(host(&be, &src.state.m).iter().all(|&x| x == 0.0));
    assert!(host(&be, src.state.v.as_ref().unwrap()).iter().all(|&x| x == 0.0));
}
