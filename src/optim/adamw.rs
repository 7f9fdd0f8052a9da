//! AdamW (docs/METHOD.md): β = (0.9, 0.95), ε = 1e-8, decoupled weight decay 0.1 on matrices only,
//! bias correction at each tensor's own step count.
//!
//! The arithmetic is the backend kernel `Backend::adamw_update`; this module is its host-side
//! reference, used by the tests to check every backend's kernel against a hand computation.

/// One AdamW step on host slices, in f64, exactly as the kernel defines it.
pub fn adamw_reference(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], lr: f64, b1: f64, b2: f64, eps: f64, wd: f64, t: u64) {
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    for i in 0..p.len() {
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        p[i] -= lr * ((m[i] / bc1) / ((v[i] / bc2).sqrt() + eps) + wd * p[i]);
    }
}
