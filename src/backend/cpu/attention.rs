//! The materialized causal attention of the CPU backend, forward and backward: per (batch, head),
//! the probabilities are kept (B·NH·T·T floats) and the products run on the register-blocked
//! [`small_gemm`] by blocks of rows that skip the masked upper triangle. Per (b, h), K (forward)
//! or V (backward) is first copied transposed into a per-thread scratch buffer, so that every
//! product reads its right operand by contiguous rows. (The tiled alternative is `flash.rs`.)

use super::kernels::{fast_exp, SendPtr};
use super::microkernel::{small_gemm, MR};
use super::wide::{lanes_sum, wide, LANES};
use rayon::prelude::*;
use std::cell::RefCell;

/// Query (and key) rows per block of the causal attention: a block of queries reads only the keys
/// up to its own last row, so the products skip most of the masked upper triangle. Two register
/// tiles of rows: the blocks are small enough that the skipped share is close to half.
const QB: usize = 2 * MR;

thread_local! {
    /// The transposed head slice (hs × T) of K or V, per pool thread; grown, never shrunk.
    static TRANSPOSED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One (b, h)'s dP, then dS (T × T), per pool thread: it stays in cache from its product
    /// to its last use, where a (B, NH, T, T) tensor would go through memory.
    static DS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a per-thread (hs, T) buffer holding `src` (T rows of hs, row stride `rs`)
/// transposed: element (d, j) = src[j·rs + d].
fn with_transposed<R>(src: *const f32, rs: usize, t: usize, hs: usize, f: impl FnOnce(&[f32]) -> R) -> R {
    TRANSPOSED.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < hs * t {
            buf.resize(hs * t, 0.0);
        }
        for j in 0..t {
            // SAFETY: the caller's slice holds T rows of hs floats at row stride rs.
            let row = unsafe { std::slice::from_raw_parts(src.add(j * rs), hs) };
            for (d, &x) in row.iter().enumerate() {
                buf[d * t + j] = x;
            }
        }
        f(&buf[..hs * t])
    })
}

/// The softmax of a row's first `len` scores (the keys a query sees), with zeros from `len` to
/// `end` (the products read no further): e_j = e^(s_j − max) for j < len, summed in 16 lanes
/// (lane j mod 16, in order of j), the lanes added by a fixed tree ([`lanes_sum`]), then
/// p_j = e_j · (1/sum). On AVX-512 it runs as vectors with the last one masked
/// ([`x86::softmax_row`]); elsewhere as plain loops of the same arithmetic, so both give the
/// same bits.
fn softmax_causal_row(row: &mut [f32], len: usize, end: usize) {
    assert!(len >= 1 && len <= end && end <= row.len(), "softmax row: {len} scores, zeros to {end}, {} floats", row.len());
    #[cfg(target_arch = "x86_64")]
    if super::wide::enabled() {
        // SAFETY: the CPU has AVX-512F (`enabled`), and row holds `end` floats (asserted).
        return unsafe { x86::softmax_row(row.as_mut_ptr(), len, end) };
    }
    softmax_row_plain(row, len, end)
}

wide! {
    /// [`softmax_causal_row`] as plain loops.
    fn softmax_row_plain(row: &mut [f32], len: usize, end: usize) {
        let maxv = row[..len].iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        let mut sums = [0.0f32; LANES];
        for (j, v) in row[..len].iter_mut().enumerate() {
            *v = fast_exp(*v - maxv);
            sums[j % LANES] += *v;
        }
        let inv = 1.0 / lanes_sum(&sums);
        row[..len].iter_mut().for_each(|v| *v *= inv);
        row[len..end].fill(0.0);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::backend::cpu::wide::x86::{lanes, lanes_sum};
    use std::arch::x86_64::*;

    /// `kernels::fast_exp` on 16 lanes: the same operations in the same order (the same bits).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
        let magic = _mm512_set1_ps(12_582_912.0);
        let n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)), magic), magic);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_359_4), x));
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
        let two_n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127))));
        _mm512_mul_ps(e, two_n)
    }

    /// `super::softmax_causal_row` on AVX-512. SAFETY: `p` holds `end` floats, 1 ≤ len ≤ end.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_row(p: *mut f32, len: usize, end: usize) {
        let nv = len.div_ceil(16);
        // The scores of vector i: its lanes below len (the rest −∞, never stored back).
        let mask = |i: usize| lanes(len - 16 * i);
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in 0..nv {
            m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), mask(i), p.add(16 * i)));
        }
        let mut lane = [0.0f32; 16];
        _mm512_storeu_ps(lane.as_mut_ptr(), m);
        let maxv = _mm512_set1_ps(lane.iter().fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a }));
        let mut s = _mm512_setzero_ps();
        for i in 0..nv {
            let x = _mm512_maskz_loadu_ps(mask(i), p.add(16 * i));
            let e = _mm512_maskz_mov_ps(mask(i), exp(_mm512_sub_ps(x, maxv)));
            s = _mm512_add_ps(s, e);
            _mm512_mask_storeu_ps(p.add(16 * i), mask(i), e);
        }
        let inv = _mm512_set1_ps(1.0 / lanes_sum(s));
        for i in 0..nv {
            let e = _mm512_maskz_loadu_ps(mask(i), p.add(16 * i));
            _mm512_mask_storeu_ps(p.add(16 * i), mask(i), _mm512_mul_ps(e, inv));
        }
        let mut j = len;
        while j < end {
            _mm512_mask_storeu_ps(p.add(j), lanes(end - j), _mm512_setzero_ps());
            j += 16;
        }
    }

    /// `super::softmax_backward_causal_row` on AVX-512. SAFETY: `d` holds `end` floats, `p` holds
    /// `len`, 1 ≤ len ≤ end.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_backward_row(d: *mut f32, p: *const f32, len: usize, end: usize) {
        let nv = len.div_ceil(16);
        let mask = |i: usize| lanes(len - 16 * i);
        let mut acc = _mm512_setzero_ps();
        for i in 0..nv {
            let (pv, dv) = (_mm512_maskz_loadu_ps(mask(i), p.add(16 * i)), _mm512_maskz_loadu_ps(mask(i), d.add(16 * i)));
            acc = _mm512_fmadd_ps(pv, dv, acc);
        }
        let dot = _mm512_set1_ps(lanes_sum(acc));
        for i in 0..nv {
            let (pv, dv) = (_mm512_maskz_loadu_ps(mask(i), p.add(16 * i)), _mm512_maskz_loadu_ps(mask(i), d.add(16 * i)));
            _mm512_mask_storeu_ps(d.add(16 * i), mask(i), _mm512_mul_ps(pv, _mm512_sub_ps(dv, dot)));
        }
        let mut j = len;
        while j < end {
            _mm512_mask_storeu_ps(d.add(j), lanes(end - j), _mm512_setzero_ps());
            j += 16;
        }
    }
}

/// A softmax row's backward: d = p ⊙ (d − p·d) over the first `len` entries, zeros from `len` to
/// `d.len()`. The dot product runs in 16 lanes of fused multiply-adds (lane j mod 16, in order of
/// j) added by [`lanes_sum`]; on AVX-512 as masked vectors ([`x86::softmax_backward_row`]),
/// elsewhere as plain loops of the same arithmetic (the same bits).
fn softmax_backward_causal_row(d: &mut [f32], p: &[f32], len: usize) {
    assert!(len >= 1 && len <= d.len() && p.len() >= len, "softmax backward row: {len} of {} floats", d.len());
    #[cfg(target_arch = "x86_64")]
    if super::wide::enabled() {
        // SAFETY: the CPU has AVX-512F (`enabled`); d holds d.len() ≥ len floats, p len.
        return unsafe { x86::softmax_backward_row(d.as_mut_ptr(), p.as_ptr(), len, d.len()) };
    }
    softmax_backward_row_plain(d, p, len)
}

wide! {
    /// [`softmax_backward_causal_row`] as plain loops.
    fn softmax_backward_row_plain(d: &mut [f32], p: &[f32], len: usize) {
        let (seen, future) = d.split_at_mut(len);
        let mut acc = [0.0f32; LANES];
        for (j, (&pv, &dv)) in p[..len].iter().zip(seen.iter()).enumerate() {
            acc[j % LANES] = pv.mul_add(dv, acc[j % LANES]);
        }
        let dot = lanes_sum(&acc);
        for (dv, &pv) in seen.iter_mut().zip(&p[..len]) {
            *dv = pv * (*dv - dot);
        }
        future.fill(0.0);
    }
}

/// qkv (B, T, 3C) holds q, k, v side by side per row; head h uses channels [h*hs, (h+1)*hs).
///
/// Per (b, h) and block of QB query rows [r0, r1): S = Q Kᵀ · scale over the keys [0, r1) only,
/// causal mask, row softmax → att (the rest of each row is 0); out = att V over the same keys.
/// Q and V are read in place through their row stride 3C; nothing but Kᵀ is copied.
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
        with_transposed(k, c3, t, hs, |kt| {
            for r0 in (0..t).step_by(QB) {
                let r1 = (r0 + QB).min(t);
                // S[r0..r1, 0..r1] = Q[r0..r1] (rows, hs) @ Kᵀ[.., 0..r1] (hs, r1) * scale
                unsafe { small_gemm(r1 - r0, r1, hs, att_bh[r0 * t..].as_mut_ptr(), t, q.add(r0 * c3), c3, 1, kt.as_ptr(), t, scale) };
                // Rows end at r1: the products (and the backward) read no column past it.
                for ti in r0..r1 {
                    softmax_causal_row(&mut att_bh[ti * t..ti * t + t], ti + 1, r1);
                }
                // out[b, r0..r1, h] (rows, hs), row stride C = att[r0..r1, 0..r1] @ V[0..r1] (r1, hs)
                unsafe {
                    let o = outp.get().add(bi * t * c + r0 * c + h * hs);
                    small_gemm(r1 - r0, hs, r1, o, c, att_bh[r0 * t..].as_ptr(), t, 1, v, c3, 1.0);
                }
            }
        });
    });
}

/// Per (b, h): dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(P ⊙ dP)); dQ = dS K · scale, by blocks of query
/// rows over the keys up to each block's end; then by blocks of key rows [k0, k1), over the
/// queries from k0 on (the earlier ones cannot see them): dV = Pᵀ dO, dK = dSᵀ Q · scale. Every
/// product overwrites its slice of dqkv, so dqkv needs no zeroing.
pub fn attention_backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], att: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    assert!(att.len() == b * nh * t * t && dqkv.len() == b * t * 3 * c, "attention_backward: shapes");
    let dp = SendPtr(dqkv.as_mut_ptr());
    // One task per (b, h): it owns head h's q/k/v slices of dqkv[b, :].
    (0..b * nh).into_par_iter().for_each(|bh| {
        DS.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < t * t {
                buf.resize(t * t, 0.0);
            }
            backward_head(dp, &mut buf[..t * t], dout, qkv, att, bh, t, c, nh);
        })
    });
}

/// The backward of one (b, h) = `bh`, with `ds` (T × T) as its dP/dS scratch.
#[allow(clippy::too_many_arguments)]
fn backward_head(dp: SendPtr, ds: &mut [f32], dout: &[f32], qkv: &[f32], att: &[f32], bh: usize, t: usize, c: usize, nh: usize) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c;
    {
        let (bi, h) = (bh / nh, bh % nh);
        let pr = &att[bh * t * t..(bh + 1) * t * t];
        let q = qkv[bi * t * c3 + h * hs..].as_ptr();
        let (k, v) = unsafe { (q.add(c), q.add(2 * c)) };
        let d_o = dout[bi * t * c + h * hs..].as_ptr();
        let dq = unsafe { dp.get().add(bi * t * c3 + h * hs) };
        let (dk, dv) = unsafe { (dq.add(c), dq.add(2 * c)) };
        with_transposed(v, c3, t, hs, |vt| {
            for r0 in (0..t).step_by(QB) {
                let r1 = (r0 + QB).min(t);
                // dP[r0..r1, 0..r1] = dO[r0..r1] (rows, hs) @ Vᵀ[.., 0..r1] (hs, r1)
                unsafe { small_gemm(r1 - r0, r1, hs, ds[r0 * t..].as_mut_ptr(), t, d_o.add(r0 * c), c, 1, vt.as_ptr(), t, 1.0) };
                for ti in r0..r1 {
                    softmax_backward_causal_row(&mut ds[ti * t..ti * t + r1], &pr[ti * t..ti * t + r1], ti + 1);
                }
                // dQ[r0..r1] (rows, hs) = dS[r0..r1, 0..r1] @ K[0..r1] (r1, hs) * scale
                unsafe { small_gemm(r1 - r0, hs, r1, dq.add(r0 * c3), c3, ds[r0 * t..].as_ptr(), t, 1, k, c3, scale) };
            }
        });
        for k0 in (0..t).step_by(QB) {
            let k1 = (k0 + QB).min(t);
            // dst[k0..k1] (rows, hs) = X[k0..t, k0..k1]ᵀ @ Y[k0..t] (t - k0, hs) · alpha, X (T, T)
            // and Y of row stride `y_rs`: Xᵀ is read with row stride 1 and column stride T.
            let product = |dst: *mut f32, x: &[f32], y: *const f32, y_rs: usize, alpha: f32| unsafe {
                small_gemm(k1 - k0, hs, t - k0, dst.add(k0 * c3), c3, x[k0 * t + k0..].as_ptr(), 1, t, y.add(k0 * y_rs), y_rs, alpha)
            };
            product(dv, pr, d_o, c, 1.0); // dV = Pᵀ dO
            product(dk, ds, q, c3, scale); // dK = dSᵀ Q · scale
        }
    }
}
