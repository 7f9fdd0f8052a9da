//! Products with few output columns (a mixture's router: OC = the experts, 8 in the demo), where
//! `gemm`'s packing and blocking cost more than the multiply.
//!
//! - forward: out[r, j] = b[j] + Σ_p x[r, p] · w[j, p]: per row, one 16-lane accumulator per
//!   output (lane l takes p ≡ l mod 16, in p order), added by a fixed tree;
//! - backward, by chunks of 16 columns: dinp[r, chunk] = Σ_j dout[r, j] · w[j, chunk] (j in
//!   order), and each block of [`BLOCK`] rows sums dout[r, j] · x[r, chunk] (rows in order) into
//!   its partial weight gradient, in registers; the blocks' partials are added to dw in block
//!   order.
//!
//! The arithmetic is fixed by the shapes alone (results do not depend on the number of
//! threads), and the AVX-512 kernels and their plain-loop copies do the same fused
//! multiply-adds per lane, so they give the same bits (`wide::set_enabled` switches between
//! them; a test compares the two).

use super::kernels;
use super::wide::{lanes_sum, LANES};
use rayon::prelude::*;

/// The widest output these kernels take.
pub const MAX_OC: usize = 16;
/// Rows per task, and per partial weight gradient of the backward.
const BLOCK: usize = 256;

/// `by_width!(oc, f, args..)` calls `f::<OC>(args..)` with OC = oc (1 ≤ oc ≤ [`MAX_OC`]): the
/// accumulators have a fixed count and stay in registers.
macro_rules! by_width {
    ($oc:expr, $($f:ident)::+, $($arg:expr),*) => {
        match $oc {
            1 => $($f)::+::<1>($($arg),*),
            2 => $($f)::+::<2>($($arg),*),
            3 => $($f)::+::<3>($($arg),*),
            4 => $($f)::+::<4>($($arg),*),
            5 => $($f)::+::<5>($($arg),*),
            6 => $($f)::+::<6>($($arg),*),
            7 => $($f)::+::<7>($($arg),*),
            8 => $($f)::+::<8>($($arg),*),
            9 => $($f)::+::<9>($($arg),*),
            10 => $($f)::+::<10>($($arg),*),
            11 => $($f)::+::<11>($($arg),*),
            12 => $($f)::+::<12>($($arg),*),
            13 => $($f)::+::<13>($($arg),*),
            14 => $($f)::+::<14>($($arg),*),
            15 => $($f)::+::<15>($($arg),*),
            16 => $($f)::+::<16>($($arg),*),
            _ => unreachable!("narrow products take 1 to {MAX_OC} output columns"),
        }
    };
}

/// out (N, OC) = inp (N, C) @ w^T + b, for 1 ≤ OC ≤ [`MAX_OC`].
pub fn forward(out: &mut [f32], inp: &[f32], w: &[f32], b: Option<&[f32]>, n: usize, c: usize, oc: usize) {
    assert!((1..=MAX_OC).contains(&oc) && out.len() >= n * oc && inp.len() >= n * c && w.len() >= oc * c, "narrow::forward: shapes");
    assert!(b.is_none_or(|b| b.len() >= oc), "narrow::forward: bias shape");
    let rows = |o: &mut [f32], x: &[f32]| {
        #[cfg(target_arch = "x86_64")]
        if super::wide::enabled() {
            // SAFETY: the CPU has AVX-512F; `o` holds the rows of `x` times OC floats (the
            // chunks below), w OC·C and b OC.
            return unsafe { by_width!(oc, x86::forward_rows, o, x, w, b, c) };
        }
        forward_rows_plain(o, x, w, b, c, oc)
    };
    out[..n * oc].par_chunks_mut(BLOCK * oc).zip(inp[..n * c].par_chunks(BLOCK * c)).for_each(|(o, x)| rows(o, x));
}

/// [`forward`]'s rows as plain loops, lane by lane.
fn forward_rows_plain(out: &mut [f32], inp: &[f32], w: &[f32], b: Option<&[f32]>, c: usize, oc: usize) {
    for (o, x) in out.chunks_exact_mut(oc).zip(inp.chunks_exact(c)) {
        for (j, oj) in o.iter_mut().enumerate() {
            let wj = &w[j * c..(j + 1) * c];
            let mut acc = [0.0f32; LANES];
            for p0 in (0..c).step_by(LANES) {
                for (l, a) in acc.iter_mut().enumerate() {
                    // Past C both factors are zero (the AVX-512 kernel's masked loads).
                    let (xv, wv) = if p0 + l < c { (x[p0 + l], wj[p0 + l]) } else { (0.0, 0.0) };
                    *a = xv.mul_add(wv, *a);
                }
            }
            *oj = b.map_or(0.0, |b| b[j]) + lanes_sum(&acc);
        }
    }
}

/// dinp (N, C) = dout (N, OC) @ w (overwritten if given, or added to dinp with `add`: each
/// element's product first, then one addition); dw (OC, C) += dout^T @ inp; for 1 ≤ OC ≤
/// [`MAX_OC`].
#[allow(clippy::too_many_arguments)]
pub fn backward(dinp: Option<&mut [f32]>, add: bool, dw: &mut [f32], dout: &[f32], inp: &[f32], w: &[f32], n: usize, c: usize, oc: usize) {
    assert!(
        (1..=MAX_OC).contains(&oc) && dout.len() >= n * oc && inp.len() >= n * c && w.len() >= oc * c && dw.len() >= oc * c,
        "narrow::backward: shapes"
    );
    assert!(dinp.as_ref().is_none_or(|d| d.len() >= n * c), "narrow::backward: dinp shape");
    let rows = |di: Option<&mut [f32]>, g: &mut [f32], d: &[f32], x: &[f32]| {
        #[cfg(target_arch = "x86_64")]
        if super::wide::enabled() {
            // SAFETY: the CPU has AVX-512F; `d` holds the block's rows times OC floats, `x` and
            // `di` its rows times C, `g` and w OC·C.
            return unsafe { by_width!(oc, x86::backward_rows, di, add, g, d, x, w, c) };
        }
        backward_rows_plain(di, add, g, d, x, w, c, oc)
    };
    let (dout, inp) = (&dout[..n * oc], &inp[..n * c]);
    // One partial per block, each wholly written by its block (the spare's contents unused).
    kernels::with_spare(n.div_ceil(BLOCK) * oc * c, |partial| {
        let parts = partial.par_chunks_mut(oc * c).zip(dout.par_chunks(BLOCK * oc)).zip(inp.par_chunks(BLOCK * c));
        match dinp {
            Some(di) => parts.zip(di[..n * c].par_chunks_mut(BLOCK * c)).for_each(|(((g, d), x), di)| rows(Some(di), g, d, x)),
            None => parts.for_each(|((g, d), x)| rows(None, g, d, x)),
        }
        dw[..oc * c].par_chunks_mut(c).enumerate().for_each(|(j, row)| {
            for g in partial.chunks_exact(oc * c) {
                row.iter_mut().zip(&g[j * c..(j + 1) * c]).for_each(|(d, &s)| *d += s);
            }
        });
    })
}

/// [`backward`]'s block as plain loops, lane by lane: dinp's rows (if given; added to with
/// `add`) and the block's partial weight gradient `g` (OC, C, overwritten).
#[allow(clippy::too_many_arguments)]
fn backward_rows_plain(mut dinp: Option<&mut [f32]>, add: bool, g: &mut [f32], dout: &[f32], inp: &[f32], w: &[f32], c: usize, oc: usize) {
    let rows = dout.len() / oc;
    for p0 in (0..c).step_by(LANES) {
        let width = LANES.min(c - p0);
        let mut acc = [[0.0f32; LANES]; MAX_OC];
        for r in 0..rows {
            let d = &dout[r * oc..(r + 1) * oc];
            if let Some(di) = dinp.as_deref_mut() {
                for l in 0..width {
                    let mut v = 0.0f32;
                    for (j, &dj) in d.iter().enumerate() {
                        v = w[j * c + p0 + l].mul_add(dj, v);
                    }
                    let o = &mut di[r * c + p0 + l];
                    *o = if add { *o + v } else { v };
                }
            }
            for (a, &dj) in acc.iter_mut().zip(d) {
                for l in 0..width {
                    a[l] = inp[r * c + p0 + l].mul_add(dj, a[l]);
                }
            }
        }
        for (j, a) in acc[..oc].iter().enumerate() {
            g[j * c + p0..j * c + p0 + width].copy_from_slice(&a[..width]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::backend::cpu::wide::x86::{lanes, lanes_sum};
    use std::arch::x86_64::*;

    /// `super::forward_rows_plain` for OC outputs. SAFETY: `out` holds whole rows of OC, `inp`
    /// as many rows of C, `w` OC·C and `b` OC floats.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn forward_rows<const OC: usize>(out: &mut [f32], inp: &[f32], w: &[f32], b: Option<&[f32]>, c: usize) {
        let (nv, w) = (c.div_ceil(16), w.as_ptr());
        for (o, x) in out.chunks_exact_mut(OC).zip(inp.chunks_exact(c)) {
            let x = x.as_ptr();
            let mut acc = [_mm512_setzero_ps(); OC];
            for i in 0..nv {
                let m = lanes(c - 16 * i);
                let xv = _mm512_maskz_loadu_ps(m, x.add(16 * i));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w.add(j * c + 16 * i)), *a);
                }
            }
            for (j, (oj, &a)) in o.iter_mut().zip(&acc).enumerate() {
                *oj = b.map_or(0.0, |b| b[j]) + lanes_sum(a);
            }
        }
    }

    /// `super::backward_rows_plain` for OC outputs: a chunk's weights and its partial weight
    /// gradient stay in registers over the block's rows. SAFETY: as [`forward_rows`], with
    /// `dinp` as `inp` and `g` OC·C floats.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward_rows<const OC: usize>(
        dinp: Option<&mut [f32]>,
        add: bool,
        g: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        c: usize,
    ) {
        let rows = dout.len() / OC;
        let (dinp, g, dout, inp, w) = (dinp.map(|d| d.as_mut_ptr()), g.as_mut_ptr(), dout.as_ptr(), inp.as_ptr(), w.as_ptr());
        for i in 0..c.div_ceil(16) {
            let (m, p0) = (lanes(c - 16 * i), 16 * i);
            let wc: [__m512; OC] = std::array::from_fn(|j| _mm512_maskz_loadu_ps(m, w.add(j * c + p0)));
            let mut acc = [_mm512_setzero_ps(); OC];
            for r in 0..rows {
                let d = dout.add(r * OC);
                if let Some(di) = dinp {
                    let mut v = _mm512_setzero_ps();
                    for (j, &wj) in wc.iter().enumerate() {
                        v = _mm512_fmadd_ps(wj, _mm512_set1_ps(*d.add(j)), v);
                    }
                    let o = di.add(r * c + p0);
                    let v = if add { _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), v) } else { v };
                    _mm512_mask_storeu_ps(o, m, v);
                }
                let xv = _mm512_maskz_loadu_ps(m, inp.add(r * c + p0));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv, _mm512_set1_ps(*d.add(j)), *a);
                }
            }
            for (j, &a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(g.add(j * c + p0), m, a);
            }
        }
    }
}
