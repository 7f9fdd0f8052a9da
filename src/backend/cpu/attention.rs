//! The materialized causal attention of the CPU backend, forward and backward: per (batch, head),
//! the probabilities are kept (B·NH·T·T floats) and the products run on the register-blocked
//! [`small_gemm`] by blocks of rows that skip the masked upper triangle. Per (b, h), K (forward)
//! or V (backward) is first copied transposed into a per-thread scratch buffer, so that every
//! product reads its right operand by contiguous rows. (The tiled alternative is `flash.rs`.)

use super::kernels::{dot8, fast_exp, max8, sum8, SendPtr};
use super::microkernel::{small_gemm, MR};
use super::wide::wide;
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

/// Lanes of the softmax rows' passes: one AVX-512 vector.
const LANES: usize = 16;

wide! {
    /// The softmax of a row's first `len` scores (the keys a query sees), with zeros from `len`
    /// to `end` (the products read no further). The passes run over whole vectors: up to 15
    /// entries past `len` are first set to a score whose exponential (e^-87, clamped) vanishes
    /// beside the maximum's 1 in the sum (past `end` they are left so). Maximum and sum run in
    /// 16 lanes, so a row of a few vectors is not one chain of dependent operations.
    fn softmax_causal_row(row: &mut [f32], len: usize, end: usize) {
        let padded = len.next_multiple_of(LANES).min(row.len());
        row[len..padded].fill(-1e30);
        let x = &mut row[..padded];
        // (A remainder of under 16 is left only where T is no multiple of 16.)
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for ch in &mut chunks {
            for k in 0..LANES {
                acc[k] = if ch[k] > acc[k] { ch[k] } else { acc[k] };
            }
        }
        for (k, &v) in chunks.remainder().iter().enumerate() {
            acc[k] = if v > acc[k] { v } else { acc[k] };
        }
        let maxv = max8(&acc);
        let mut sums = [0.0f32; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for ch in &mut chunks {
            for k in 0..LANES {
                ch[k] = fast_exp(ch[k] - maxv);
                sums[k] += ch[k];
            }
        }
        for (k, v) in chunks.into_remainder().iter_mut().enumerate() {
            *v = fast_exp(*v - maxv);
            sums[k] += *v;
        }
        let inv = 1.0 / sum8(&sums);
        row[..len].iter_mut().for_each(|v| *v *= inv);
        row[len..end].fill(0.0);
    }
}

wide! {
    /// A softmax row's backward: d = p ⊙ (d − p·d) over the first `len` entries; the rest 0.
    fn softmax_backward_causal_row(d: &mut [f32], p: &[f32], len: usize) {
        let (seen, future) = d.split_at_mut(len);
        let dot = dot8(&p[..len], seen);
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
