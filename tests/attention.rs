//! Flash attention on the CPU (`kernels.attention = "flash"`, backend/cpu/flash.rs): the tiled
//! online-softmax forward and the recomputing backward against the materialized attention and
//! against finite differences, across tile boundaries (T > 64, T not a multiple of 64); its
//! logsumexp against the probabilities; its memory; a whole training run with it.

mod common;

use common::{buf, host, randn, synthetic_dataset, TestConfig};
use taproot::backend::cpu::CpuBackend;
use taproot::backend::{Attention, Backend, Precision};
use taproot::data::Dataset;
use taproot::rng::Rng;
use taproot::train::sequential::Sequential;
use taproot::train::RunOptions;

type B = CpuBackend;

fn stream(a: Attention, p: Precision) -> B {
    let be = B::default();
    be.set_precision(p).unwrap();
    be.set_attention(a).unwrap();
    be
}

/// (out, att state, dqkv) of one forward and backward with upstream gradient `dout`.
fn run(be: &B, qkv: &[f32], dout: &[f32], b: usize, t: usize, c: usize, nh: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (out, att) = (be.alloc(b * t * c), be.alloc(be.attention_state_len(b, t, nh)));
    let qb = buf(be, qkv);
    be.attention_forward(B::whole(&out), B::whole(&att), B::whole(&qb), b, t, c, nh);
    let (dqkv, datt, db) = (buf(be, &vec![3.0; b * t * 3 * c]), be.alloc(be.attention_scratch_len(b, t, nh)), buf(be, dout));
    be.attention_backward(B::whole(&dqkv), B::whole(&datt), B::whole(&db), B::whole(&qb), B::whole(&out), B::whole(&att), b, t, c, nh);
    (host(be, &out), host(be, &att), host(be, &dqkv))
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// fp32: flash equals the materialized attention to rounding (1e-5), over T = 150 (three key
/// tiles, the last partial), and its logsumexp is log Σ exp of the scores the probabilities came
/// from: ln p_ij = s_ij − L_i, so L_i = s_ij − ln p_ij for every j ≤ i.
#[test]
fn flash_attention_matches_the_materialized_attention() {
    let (b, t, c, nh) = (2, 150, 32, 2);
    let hs = c / nh;
    let mut r = Rng::new(7);
    let qkv = randn(&mut r, b * t * 3 * c, 1.0);
    let dout = randn(&mut r, b * t * c, 1.0);
    let (o1, att, d1) = run(&stream(Attention::Materialized, Precision::Fp32), &qkv, &dout, b, t, c, nh);
    let flash = stream(Attention::Flash, Precision::Fp32);
    let (o2, lse, d2) = run(&flash, &qkv, &dout, b, t, c, nh);
    assert_eq!(lse.len(), b * nh * t, "flash keeps one float per row");
    assert_eq!(att.len(), b * nh * t * t);
    let (ro, rd) = (rel(&o2, &o1), rel(&d2, &d1));
    println!("flash against materialized, fp32: out {ro:.2e}, dqkv {rd:.2e}");
    assert!(ro < 1e-5 && rd < 1e-5, "out {ro:.3e}, dqkv {rd:.3e}");
    let scale = 1.0 / (hs as f64).sqrt();
    let mut worst = 0.0f64;
    for bi in 0..b {
        for h in 0..nh {
            for i in [0, 63, 64, 100, t - 1] {
                let q = &qkv[(bi * t + i) * 3 * c + h * hs..][..hs];
                for j in [0, i / 2, i] {
                    let k = &qkv[(bi * t + j) * 3 * c + c + h * hs..][..hs];
                    let s: f64 = q.iter().zip(k).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>() * scale;
                    let p = att[((bi * nh + h) * t + i) * t + j] as f64;
                    let l = lse[(bi * nh + h) * t + i] as f64;
                    worst = worst.max((s - p.ln() - l).abs());
                }
            }
        }
    }
    println!("logsumexp against the probabilities: worst {worst:.2e}");
    assert!(worst < 1e-4, "logsumexp off by {worst:.3e}");
}

/// The flash backward against central differences of L = Σ out · r (h = 1e-2, ≤ 1e-2 relative,
/// the bar of tests/gradients.rs), with T = 70 so the keys span two tiles.
#[test]
fn flash_attention_backward_matches_finite_differences() {
    let be = stream(Attention::Flash, Precision::Fp32);
    let (b, t, c, nh) = (1, 70, 8, 2);
    let mut rng = Rng::new(9);
    let qkv = randn(&mut rng, b * t * 3 * c, 1.0);
    let r = randn(&mut rng, b * t * c, 1.0);
    let loss = |x: &[f32]| -> f64 {
        let (out, att) = (be.alloc(b * t * c), be.alloc(be.attention_state_len(b, t, nh)));
        let qb = buf(&be, x);
        be.attention_forward(B::whole(&out), B::whole(&att), B::whole(&qb), b, t, c, nh);
        host(&be, &out).iter().zip(&r).map(|(o, y)| *o as f64 * *y as f64).sum()
    };
    let (_, _, dq) = run(&be, &qkv, &r, b, t, c, nh);
    let h = 1e-2f32;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    // Entries of q, k and v of rows on both sides of the tile boundary.
    let mut idx = Vec::new();
    for row in [0usize, 5, 63, 64, 69] {
        for part in 0..3 {
            for d in [0usize, 3, 6] {
                idx.push(row * 3 * c + part * c + d);
            }
        }
    }
    for &i in &idx {
        let mut x = qkv.clone();
        x[i] += h;
        let up = loss(&x);
        x[i] -= 2.0 * h;
        let down = loss(&x);
        let fd = (up - down) / (2.0 * h as f64);
        num += (fd - dq[i] as f64).powi(2);
        den += (dq[i] as f64).powi(2);
    }
    let rel = (num / den).sqrt();
    println!("flash backward against finite differences: {rel:.2e}");
    assert!(den > 0.0 && rel < 1e-2, "relative error {rel:.3e}");
}

/// In bf16 flash rounds P and dS where the GPU kernel does; it stays within bf16's reach of the
/// materialized bf16 attention (2e-2) and of fp32 (2e-2), and really differs from fp32 flash.
#[test]
fn bf16_flash_attention_stays_within_bf16_bounds() {
    let (b, t, c, nh) = (1, 130, 32, 2);
    let mut r = Rng::new(11);
    let qkv = randn(&mut r, b * t * 3 * c, 1.0);
    let dout = randn(&mut r, b * t * c, 1.0);
    let (o32, _, d32) = run(&stream(Attention::Flash, Precision::Fp32), &qkv, &dout, b, t, c, nh);
    let (om, _, dm) = run(&stream(Attention::Materialized, Precision::Bf16), &qkv, &dout, b, t, c, nh);
    let (of, _, df) = run(&stream(Attention::Flash, Precision::Bf16), &qkv, &dout, b, t, c, nh);
    let rows = [("vs fp32", rel(&of, &o32), rel(&df, &d32)), ("vs materialized bf16", rel(&of, &om), rel(&df, &dm))];
    for (what, ro, rd) in rows {
        println!("bf16 flash {what}: out {ro:.2e}, dqkv {rd:.2e}");
        assert!(ro < 2e-2 && rd < 2e-2, "{what}: out {ro:.3e}, dqkv {rd:.3e}");
    }
    assert!(rel(&of, &o32) > 1e-5, "bf16 flash equals fp32 flash: no rounding happened");
}

/// A run with flash attention trains like the materialized one (fp32: every step's loss within
/// 1e-4), growth included, and its attention state is T times smaller.
#[test]
fn a_training_run_with_flash_attention_matches_the_materialized_run() {
    let dir = synthetic_dataset("flash-run");
    let data = Dataset::open(&dir, 256).unwrap();
    let cfg = |name: &str| {
        TestConfig::new(&dir)
            .name(name)
            .steps(30)
            .batch_size(4)
            .seq_len(80)
            .channels(32)
            .depth(1)
            .target_depth(2)
            .eval(15, 2)
            .grow_at_step(15, 2)
    };
    let q = RunOptions { quiet: true, ..Default::default() };
    let mat = Sequential::new(B::default(), &cfg("mat").build(), &data).unwrap().run(&q).unwrap();
    let flash_cfg = cfg("flash").set("kernels.attention", "flash").build();
    let fl = Sequential::new(B::default(), &flash_cfg, &data).unwrap().run(&q).unwrap();
    for (a, b) in mat.steps.iter().zip(&fl.steps) {
        let r = ((a.train_loss - b.train_loss) / a.train_loss).abs();
        assert!(r < 1e-4, "step {}: flash {} materialized {}", a.step, b.train_loss, a.train_loss);
    }
    assert_eq!(fl.growth.len(), 1);
    let be = stream(Attention::Flash, Precision::Fp32);
    assert_eq!(be.attention_state_len(4, 80, 2) * 80, stream(Attention::Materialized, Precision::Fp32).attention_state_len(4, 80, 2));
    // And the memory estimate knows it.
    let (m, f) = (taproot::config::memory::estimate(&cfg("m").build()), taproot::config::memory::estimate(&flash_cfg));
    assert!(f.activations < m.activations, "flash does not lower the activation estimate");
    // On CUDA, flash needs bf16 and a head size of 64 or 128: a clear config error otherwise.
    let err = format!(
        "{:#}",
        taproot::config::Config::parse(&cfg("x").set("kernels.attention", "flash").devices(&["cuda:0"]).text(), &[]).unwrap_err()
    );
    assert!(err.contains("kernels.attention") && err.contains("bf16"), "{err}");
    let text = cfg("x").set("kernels.attention", "flash").set("precision.compute", "bf16").devices(&["cuda:0"]).text();
    let err = format!("{:#}", taproot::config::Config::parse(&text, &[]).unwrap_err());
    assert!(err.contains("head sizes 64 and 128"), "{err}");
}
