//! Muon (on 2-D tensors) and normalised SGD (on the rest) — the paper's `muon_nsgd` optimizer.
//!
//! Muon, per docs/METHOD.md: momentum 0.95 with Nesterov (m ← μm + g; u = g + μm), then 5
//! Newton–Schulz steps with (a, b, c) = (3.4445, −4.7750, 2.0315) on the Frobenius-normalised
//! update, which pushes its singular values toward 1 (roughly into [0.5, 1.5]); the result is
//! scaled by max(1, rows/cols)^0.5 and applied with decoupled weight decay.
//!
//! Newton–Schulz is built from backend matrix products only, so it runs on any device:
//! for a wide matrix X (rows ≤ cols), A = X Xᵀ, B = bA + cA², X ← aX + BX.
//! For a tall one the transposed iteration is used without transposing memory:
//! A = XᵀX, B = bA + cA², X ← aX + XB (the same as iterating on Xᵀ and transposing back).
//!
//! NSGD: m ← μm + g (plain momentum), p ← p − lr·m/‖m‖_F. The norm stays on the device.

use super::config::OptimConfig;
use crate::backend::{Backend, Trans, View};

/// Reusable device scratch for the optimizer: grows to the largest tensor it has seen, then
/// never allocates again. One per stage (it is shared by the stage's units).
pub struct Scratch<B: Backend> {
    x: Option<B::Buf>,  // (r, c) the update being orthogonalised
    x2: Option<B::Buf>, // (r, c) ping-pong partner of x
    a: Option<B::Buf>,  // (k, k), k = min(r, c)
    bm: Option<B::Buf>, // (k, k)
    ss: Option<B::Buf>, // (1) a device-side sum of squares
}

impl<B: Backend> Default for Scratch<B> {
    fn default() -> Self {
        Scratch { x: None, x2: None, a: None, bm: None, ss: None }
    }
}

fn ensure<B: Backend>(be: &B, slot: &mut Option<B::Buf>, n: usize) {
    if slot.as_ref().map(|b| B::buf_len(b) < n).unwrap_or(true) {
        *slot = Some(be.alloc(n));
    }
}

impl<B: Backend> Scratch<B> {
    /// Σ x² of a view, computed on the device and read back (one scalar: a synchronisation).
    pub fn sumsq(&mut self, be: &B, x: View<B::Buf>) -> f64 {
        ensure(be, &mut self.ss, 1);
        let ss = View::new(self.ss.as_ref().expect("ensured"), 0, 1);
        be.sumsq(ss, x);
        let mut h = [0.0f32];
        be.download(ss, &mut h);
        h[0] as f64
    }

    fn ensure(&mut self, be: &B, rc: usize, kk: usize) {
        ensure(be, &mut self.x, rc);
        ensure(be, &mut self.x2, rc);
        ensure(be, &mut self.a, kk);
        ensure(be, &mut self.bm, kk);
        ensure(be, &mut self.ss, 1);
    }
}

/// Orthogonalise `x` (r, c) in place by `steps` Newton–Schulz iterations; `x2`, `a`, `bm` are
/// scratch. `x` must already be normalised (‖x‖_F ≤ 1). Returns whether the result ended in
/// `x2` (after an odd number of swaps) — the caller reads it from there.
pub fn newton_schulz<B: Backend>(
    be: &B,
    x: View<B::Buf>,
    x2: View<B::Buf>,
    a: View<B::Buf>,
    bm: View<B::Buf>,
    r: usize,
    c: usize,
    steps: usize,
    coeffs: [f32; 3],
) -> bool {
    let [ca, cb, cc] = coeffs;
    let (mut cur, mut nxt) = (x, x2);
    for _ in 0..steps {
        if r <= c {
            be.gemm(a, cur, Trans::N, cur, Trans::T, r, r, c, 1.0, 0.0); // A = X Xᵀ (r, r)
            be.gemm(bm, a, Trans::N, a, Trans::N, r, r, r, 1.0, 0.0); // A²
            be.axpby(bm, cc, cb, a); // B = c A² + b A
            be.gemm(nxt, bm, Trans::N, cur, Trans::N, r, c, r, 1.0, 0.0); // B X (r, c)
        } else {
            be.gemm(a, cur, Trans::T, cur, Trans::N, c, c, r, 1.0, 0.0); // A = XᵀX (c, c)
            be.gemm(bm, a, Trans::N, a, Trans::N, c, c, c, 1.0, 0.0);
            be.axpby(bm, cc, cb, a);
            be.gemm(nxt, cur, Trans::N, bm, Trans::N, r, c, c, 1.0, 0.0); // X B (r, c)
        }
        be.axpby(nxt, 1.0, ca, cur); // X' = a X + (B X | X B)
        std::mem::swap(&mut cur, &mut nxt);
    }
    steps % 2 == 1
}

/// One Muon step of a (rows, cols) tensor.
pub fn muon_update<B: Backend>(
    be: &B,
    cfg: &OptimConfig,
    p: View<B::Buf>,
    g: View<B::Buf>,
    m: View<B::Buf>,
    rows: usize,
    cols: usize,
    s: &mut Scratch<B>,
    lr: f32,
    wd: f32,
) {
    let n = rows * cols;
    let k = rows.min(cols);
    s.ensure(be, n, k * k);
    let x = View::new(s.x.as_ref().expect("ensured"), 0, n);
    let x2 = View::new(s.x2.as_ref().expect("ensured"), 0, n);
    let a = View::new(s.a.as_ref().expect("ensured"), 0, k * k);
    let bm = View::new(s.bm.as_ref().expect("ensured"), 0, k * k);
    let ss = View::new(s.ss.as_ref().expect("ensured"), 0, 1);
    be.momentum_update(x, m, g, cfg.momentum, cfg.nesterov);
    be.sumsq(ss, x);
    be.scale_by_rnorm(x, ss, 1e-7);
    let in_x2 = newton_schulz(be, x, x2, a, bm, rows, cols, cfg.ns_steps, cfg.ns_coeffs);
    let u = if in_x2 { x2 } else { x };
    let scale = (rows as f32 / cols as f32).max(1.0).sqrt();
    be.apply_update(p, u, lr, scale, wd);
}

/// One normalised-SGD step of a tensor.
pub fn nsgd_update<B: Backend>(
    be: &B,
    cfg: &OptimConfig,
    p: View<B::Buf>,
    g: View<B::Buf>,
    m: View<B::Buf>,
    s: &mut Scratch<B>,
    lr: f32,
    wd: f32,
) {
    let n = p.len;
    s.ensure(be, n, 1);
    let u = View::new(s.x.as_ref().expect("ensured"), 0, n);
    let ss = View::new(s.ss.as_ref().expect("ensured"), 0, 1);
    // NSGD uses plain (heavy-ball) momentum: the update direction is m itself.
    be.momentum_update(u, m, g, cfg.momentum, false);
    be.sumsq(ss, u);
    be.nsgd_apply(p, u, ss, lr, wd, 1e-8);
}

/// Host reference of the whole Muon step in f64 (tests compare backends against it).
pub fn muon_reference(p: &mut [f64], g: &[f64], m: &mut [f64], rows: usize, cols: usize, cfg: &OptimConfig, lr: f64, wd: f64) {
    let mu = cfg.momentum as f64;
    let mut x = vec![0.0; rows * cols];
    for i in 0..x.len() {
        m[i] = mu * m[i] + g[i];
        x[i] = if cfg.nesterov { g[i] + mu * m[i] } else { m[i] };
    }
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    x.iter_mut().for_each(|v| *v /= norm + 1e-7);
    let o = newton_schulz_reference(&x, rows, cols, cfg.ns_steps, cfg.ns_coeffs.map(|c| c as f64));
    let scale = (rows as f64 / cols as f64).max(1.0).sqrt();
    for i in 0..p.len() {
        p[i] = p[i] * (1.0 - lr * wd) - lr * scale * o[i];
    }
}

/// Newton–Schulz on the host in f64, iterating on the transpose for tall matrices (the textbook
/// form, independent of the backend's transpose-free formulation).
pub fn newton_schulz_reference(x: &[f64], rows: usize, cols: usize, steps: usize, coeffs: [f64; 3]) -> Vec<f64> {
    let tall = rows > cols;
    let (r, c) = if tall { (cols, rows) } else { (rows, cols) };
    let mut xm: Vec<f64> = if tall { transpose(x, rows, cols) } else { x.to_vec() };
    let [ca, cb, cc] = coeffs;
    for _ in 0..steps {
        let a = matmul(&xm, &transpose(&xm, r, c), r, c, r); // (r, r)
        let a2 = matmul(&a, &a, r, r, r);
        let bm: Vec<f64> = a.iter().zip(&a2).map(|(a, a2)| cb * a + cc * a2).collect();
        let bx = matmul(&bm, &xm, r, r, c);
        xm = xm.iter().zip(&bx).map(|(x, y)| ca * x + y).collect();
    }
    if tall {
        transpose(&xm, r, c)
    } else {
        xm
    }
}

fn transpose(x: &[f64], r: usize, c: usize) -> Vec<f64> {
    let mut t = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = x[i * c + j];
        }
    }
    t
}

/// (m, k) @ (k, n)
fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p];
            for j in 0..n {
                out[i * n + j] += av * b[p * n + j];
            }
        }
    }
    out
}
