//! The materialized causal attention of the CPU backend, forward and backward: per (batch, head),
//! the probabilities are kept (B·NH·T·T floats) and the products are `gemm` calls by blocks of
//! rows that skip the masked upper triangle. (The tiled alternative is `flash.rs`.)

use super::kernels::{dot8, exp_shifted_sum, gemm_raw_par, max8, SendPtr};
use rayon::prelude::*;

/// Query (and key) rows per block of the causal attention: a block of queries reads only the keys
/// up to its own last row, so the products skip most of the masked upper triangle.
const QB: usize = 32;

/// qkv (B, T, 3C) holds q, k, v side by side per row; head h uses channels [h*hs, (h+1)*hs).
///
/// Per (b, h) and block of QB query rows [r0, r1): S = Q Kᵀ · scale over the keys [0, r1) only,
/// causal mask, row softmax → att (the rest of each row is 0); out = att V over the same keys.
/// The products are `gemm` calls that read Q, K, V in place through strides (row stride 3C), so
/// nothing is copied; the blocks skip all but the diagonal blocks' share of the masked FLOPs.
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c;
    assert!(att.len() == b * nh * t * t && out.len() == b * t * c && qkv.len() == b * t * c3, "attention_forward: shapes");
    let outp = SendPtr(out.as_mut_ptr());
    // One task per (b, h): it owns att[b, h] and the h-th head slice of out[b, :].
    att.par_chunks_mut(t * t).enumerate().for_each(|(bh, att_bh)| {
        let (bi, h) = (bh / nh, bh % nh);
        let q = qkv[bi * t * c3 + h * hs..].as_ptr();
        let (k, v) = unsafe { (q.add(c), q.add(2 * c)) };
        for r0 in (0..t).step_by(QB) {
            let (r1, s) = ((r0 + QB).min(t), att_bh[r0 * t..].as_mut_ptr());
            unsafe {
                // S[r0..r1, 0..r1] = Q[r0..r1] (QB, hs) @ K[0..r1]ᵀ (hs, r1) * scale
                let qr = q.add(r0 * c3);
                gemm_raw_par(r1 - r0, r1, hs, s, t as isize, 1, qr, c3 as isize, 1, k, 1, c3 as isize, 0.0, scale, false);
            }
            for ti in r0..r1 {
                let row = &mut att_bh[ti * t..ti * t + t];
                let maxv = max8(&row[..=ti]);
                let sum = exp_shifted_sum(&mut row[..=ti], maxv);
                let inv = 1.0 / sum;
                for x in row[..=ti].iter_mut() {
                    *x *= inv;
                }
                row[ti + 1..].fill(0.0); // future positions: probability 0
            }
            unsafe {
                // out[b, r0..r1, h] (QB, hs), row stride C = att[r0..r1, 0..r1] @ V[0..r1] (r1, hs)
                let o = outp.get().add(bi * t * c + r0 * c + h * hs);
                gemm_raw_par(
                    r1 - r0,
                    hs,
                    r1,
                    o,
                    c as isize,
                    1,
                    att_bh[r0 * t..].as_ptr(),
                    t as isize,
                    1,
                    v,
                    c3 as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                );
            }
        }
    });
}

/// Per (b, h): dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(P ⊙ dP)); dQ = dS K · scale, by blocks of query
/// rows over the keys up to each block's end; then by blocks of key rows [k0, k1), over the
/// queries from k0 on (the earlier ones cannot see them): dV = Pᵀ dO, dK = dSᵀ Q · scale. Every
/// product overwrites its slice of dqkv, so dqkv needs no zeroing.
pub fn attention_backward(
    dqkv: &mut [f32],
    datt: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c;
    assert!(datt.len() == b * nh * t * t && dqkv.len() == b * t * c3, "attention_backward: shapes");
    let dp = SendPtr(dqkv.as_mut_ptr());
    // One task per (b, h): it owns datt[b, h] and head h's q/k/v slices of dqkv[b, :].
    datt.par_chunks_mut(t * t).enumerate().for_each(|(bh, ds)| {
        let (bi, h) = (bh / nh, bh % nh);
        let pr = &att[bh * t * t..(bh + 1) * t * t];
        let q = qkv[bi * t * c3 + h * hs..].as_ptr();
        let (k, v) = unsafe { (q.add(c), q.add(2 * c)) };
        let d_o = dout[bi * t * c + h * hs..].as_ptr();
        let dq = unsafe { dp.get().add(bi * t * c3 + h * hs) };
        let (dk, dv) = unsafe { (dq.add(c), dq.add(2 * c)) };
        for r0 in (0..t).step_by(QB) {
            let r1 = (r0 + QB).min(t);
            unsafe {
                // dP[r0..r1, 0..r1] = dO[r0..r1] (QB, hs) @ V[0..r1]ᵀ (hs, r1)
                let s = ds[r0 * t..].as_mut_ptr();
                gemm_raw_par(r1 - r0, r1, hs, s, t as isize, 1, d_o.add(r0 * c), c as isize, 1, v, 1, c3 as isize, 0.0, 1.0, false);
            }
            for ti in r0..r1 {
                let a = &pr[ti * t..ti * t + t];
                let d = &mut ds[ti * t..ti * t + t];
                let dot = dot8(&a[..=ti], &d[..=ti]);
                for t2 in 0..=ti {
                    d[t2] = a[t2] * (d[t2] - dot);
                }
                d[ti + 1..].fill(0.0);
            }
            unsafe {
                // dQ[r0..r1] (QB, hs) = dS[r0..r1, 0..r1] @ K[0..r1] (r1, hs) * scale
                gemm_raw_par(
                    r1 - r0,
                    hs,
                    r1,
                    dq.add(r0 * c3),
                    c3 as isize,
                    1,
                    ds[r0 * t..].as_ptr(),
                    t as isize,
                    1,
                    k,
                    c3 as isize,
                    1,
                    0.0,
                    scale,
                    false,
                );
            }
        }
        for k0 in (0..t).step_by(QB) {
            let k1 = (k0 + QB).min(t);
            // dst[k0..k1] (QB, hs) = X[k0..t, k0..k1]ᵀ @ Y[k0..t] (t - k0, hs) · alpha, X (T, T)
            // and Y of row stride `y_rs`.
            let product = |dst: *mut f32, x: &[f32], y: *const f32, y_rs: usize, alpha: f32| unsafe {
                let (x, y) = (x[k0 * t + k0..].as_ptr(), y.add(k0 * y_rs));
                gemm_raw_par(
                    k1 - k0,
                    hs,
                    t - k0,
                    dst.add(k0 * c3),
                    c3 as isize,
                    1,
                    x,
                    1,
                    t as isize,
                    y,
                    y_rs as isize,
                    1,
                    0.0,
                    alpha,
                    false,
                )
            };
            product(dv, pr, d_o, c, 1.0); // dV = Pᵀ dO
            product(dk, ds, q, c3, scale); // dK = dSᵀ Q · scale
        }
    });
}
