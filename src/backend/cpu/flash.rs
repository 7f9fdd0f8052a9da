//! Tiled attention with an online softmax (FlashAttention-2's algorithm) on the CPU: the
//! reference the CUDA flash kernels are tested against, and `kernels.attention = "flash"` on
//! the CPU.
//!
//! Forward, per (b, h) and query row i: walk the keys j ≤ i in tiles of [`TILE`], keeping a
//! running maximum m, a running sum l of exp(s − m) and an accumulator of exp(s − m)·V, each
//! rescaled by exp(m_old − m_new) when a tile raises the maximum. Nothing of size T×T is kept:
//! the output and the logsumexp L_i = m + ln l (B, NH, T) are all that the backward needs.
//!
//! Backward, per (b, h): P_ij = exp(s_ij − L_i) is recomputed from the logsumexp; with
//! D_i = dO_i · O_i (the caller's `d`, from the fp32 output), dS_ij = P_ij (dO_i · V_j − D_i),
//! dV_j += P_ij dO_i, dQ_i += dS_ij K_j · scale, dK_j += dS_ij Q_i · scale.
//!
//! Precision: the caller passes q, k, v and dO already rounded as its products read them; here
//! P (into P·V and Pᵀ·dO) and dS (into dS·K and dSᵀ·Q) are rounded the same way, exactly where
//! the GPU kernel packs them into bf16 for its tensor cores. Sums (l, D, the accumulators) stay
//! f32. Tiles start at key 0 and are [`TILE`] wide on both, so the rescaling points match too.

use super::kernels::{dot8, SendPtr};
use crate::backend::Precision;
use rayon::prelude::*;

/// Keys per tile (the GPU kernels' tile width).
pub const TILE: usize = 64;

/// out (B, T, C) and lse (B, NH, T) from qkv (B, T, 3C), causal, scale 1/sqrt(hs).
pub fn flash_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize, prec: Precision) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c;
    assert!(lse.len() == b * nh * t && out.len() == b * t * c && qkv.len() == b * t * c3, "flash_forward: shapes");
    let outp = SendPtr(out.as_mut_ptr());
    // One task per (b, h): it owns lse[b, h] and the h-th head slice of out[b, :].
    lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse_bh)| {
        let (bi, h) = (bh / nh, bh % nh);
        let row = |ti: usize, part: usize| &qkv[(bi * t + ti) * c3 + part * c + h * hs..][..hs];
        let mut s = [0.0f32; TILE];
        let mut acc = vec![0.0f32; hs];
        for (ti, lse_i) in lse_bh.iter_mut().enumerate() {
            let q = row(ti, 0);
            let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
            acc.fill(0.0);
            let mut k0 = 0;
            while k0 <= ti {
                let k1 = (k0 + TILE).min(ti + 1);
                let mut tile_max = f32::NEG_INFINITY;
                for (j, kj) in (k0..k1).enumerate() {
                    s[j] = dot8(q, row(kj, 1)) * scale;
                    tile_max = tile_max.max(s[j]);
                }
                let m_new = m.max(tile_max);
                let alpha = (m - m_new).exp(); // 0 on the first tile (m = -inf)
                l *= alpha;
                acc.iter_mut().for_each(|a| *a *= alpha);
                for (j, kj) in (k0..k1).enumerate() {
                    let p = (s[j] - m_new).exp();
                    l += p;
                    let pr = prec.round(p);
                    for (a, &v) in acc.iter_mut().zip(row(kj, 2)) {
                        *a += pr * v;
                    }
                }
                m = m_new;
                k0 = k1;
            }
            let inv = 1.0 / l;
            // SAFETY: this task alone writes head h's slice of row (bi, ti).
            let o = unsafe { std::slice::from_raw_parts_mut(outp.get().add((bi * t + ti) * c + h * hs), hs) };
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = a * inv;
            }
            *lse_i = m + l.ln();
        }
    });
}

/// D (B, NH, T) = rowsum(dO ⊙ O) per head, from the fp32 dout and out (B, T, C).
pub fn flash_rowdot(d: &mut [f32], dout: &[f32], out: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    let hs = c / nh;
    assert!(d.len() == b * nh * t && dout.len() == b * t * c && out.len() == b * t * c, "flash_rowdot: shapes");
    d.par_chunks_mut(t).enumerate().for_each(|(bh, d_bh)| {
        let (bi, h) = (bh / nh, bh % nh);
        for (ti, di) in d_bh.iter_mut().enumerate() {
            let o = (bi * t + ti) * c + h * hs;
            *di = dot8(&dout[o..o + hs], &out[o..o + hs]);
        }
    });
}

/// dqkv (B, T, 3C) overwritten, from dout (B, T, C), qkv, the forward's lse and D (see
/// [`flash_rowdot`]).
pub fn flash_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    lse: &[f32],
    d: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    prec: Precision,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c;
    assert!(
        dqkv.len() == b * t * c3 && dout.len() == b * t * c && lse.len() == b * nh * t && d.len() == b * nh * t,
        "flash_backward: shapes"
    );
    let dp = SendPtr(dqkv.as_mut_ptr());
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / nh, bh % nh);
        let row = |ti: usize, part: usize| &qkv[(bi * t + ti) * c3 + part * c + h * hs..][..hs];
        // SAFETY: this task alone touches head h's q/k/v slices of the rows of batch bi.
        let grad =
            |ti: usize, part: usize| unsafe { std::slice::from_raw_parts_mut(dp.get().add((bi * t + ti) * c3 + part * c + h * hs), hs) };
        for ti in 0..t {
            for part in 0..3 {
                grad(ti, part).fill(0.0);
            }
        }
        for ti in 0..t {
            let (q, g) = (row(ti, 0), &dout[(bi * t + ti) * c + h * hs..][..hs]);
            let (l_i, d_i) = (lse[bh * t + ti], d[bh * t + ti]);
            let dq = grad(ti, 0);
            for kj in 0..=ti {
                let (k, v) = (row(kj, 1), row(kj, 2));
                let p = (dot8(q, k) * scale - l_i).exp();
                let ds = p * (dot8(g, v) - d_i);
                let (pr, dsr) = (prec.round(p), prec.round(ds) * scale);
                for (x, &gg) in grad(kj, 2).iter_mut().zip(g) {
                    *x += pr * gg;
                }
                for (x, &kk) in dq.iter_mut().zip(k) {
                    *x += dsr * kk;
                }
                for (x, &qq) in grad(kj, 1).iter_mut().zip(q) {
                    *x += dsr * qq;
                }
            }
        }
    });
}
