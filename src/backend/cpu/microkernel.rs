//! A register-blocked product for the small, oddly strided operands of attention (a head's
//! 32-wide slices, blocks of a T×T probability matrix), where a general `gemm` call spends more
//! time packing and dispatching than multiplying.
//!
//! C (m×n) = alpha · A (m×k) · B (k×n), overwritten. A is read one element at a time (broadcast),
//! so it may have any strides — a transposed operand costs nothing. B's rows are read as vectors
//! and must be contiguous (row stride free). Each tile of C (up to 24 vectors with AVX-512, 12
//! with AVX2) stays in registers over the whole k loop; nothing is packed or allocated. Columns past n are
//! masked off, never read or written.
//!
//! Summation: each C element is a single chain of fused multiply-adds over p = 0..k in order,
//! then one multiply by alpha — fixed by the shapes alone, so results are reproducible.
//!
//! Kernels: AVX-512 (16 lanes) where the CPU has it, AVX2 + FMA (8 lanes) otherwise, and plain
//! loops off x86.

/// Rows of C per register tile: with two vectors per row, 12 accumulators, two B vectors and a
/// broadcast — within AVX2's 16 registers.
pub const MR: usize = 6;

/// C (m×n, row stride `c_rs`) = alpha · A · B, where A (m×k) has element (i, p) at
/// `a[i·a_rs + p·a_cs]` and B (k×n) has element (p, j) at `b[p·b_rs + j]`.
///
/// SAFETY: every element named by these shapes and strides is in bounds, and C overlaps neither
/// A nor B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn small_gemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    alpha: f32,
) {
    let g = Gemm { k, c, c_rs, a, a_rs, a_cs, b, b_rs, alpha };
    #[cfg(target_arch = "x86_64")]
    {
        // The same switch as the elementwise kernels' wide copies (`wide::set_enabled`).
        if super::wide::enabled() {
            return x86::gemm512(&g, m, n);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return x86::gemm256(&g, m, n);
        }
    }
    scalar(&g, m, n)
}

/// The operands of one call (everything but the extent of C).
struct Gemm {
    k: usize,
    c: *mut f32,
    c_rs: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    alpha: f32,
}

/// The reference loops (and the kernel off x86): the same order of summation as the vector ones.
unsafe fn scalar(g: &Gemm, m: usize, n: usize) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f32;
            for p in 0..g.k {
                s = (*g.a.add(i * g.a_rs + p * g.a_cs)).mul_add(*g.b.add(p * g.b_rs + j), s);
            }
            *g.c.add(i * g.c_rs + j) = g.alpha * s;
        }
    }
}

// The tiles index their register arrays by row and vector number: loops of compile-time length
// that the compiler unrolls, clearer as indices than as zipped iterators.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use crate::backend::cpu::microkernel::{Gemm, MR};
    use std::arch::x86_64::*;

    /// Walks C in tiles of up to MR rows by `2·lanes` columns, calling the tile kernel with its
    /// row count and vector count fixed at compile time (so the accumulators are registers).
    macro_rules! walk {
        ($g:expr, $m:expr, $n:expr, $lanes:expr, $tile:ident) => {{
            let (g, m, n) = ($g, $m, $n);
            let mut j0 = 0;
            while j0 < n {
                let w = (n - j0).min(2 * $lanes);
                let mut i0 = 0;
                while i0 < m {
                    let r = (m - i0).min(MR);
                    let at = (i0, j0, w);
                    match (r, w > $lanes) {
                        (6, true) => $tile::<6, 2>(g, at),
                        (5, true) => $tile::<5, 2>(g, at),
                        (4, true) => $tile::<4, 2>(g, at),
                        (3, true) => $tile::<3, 2>(g, at),
                        (2, true) => $tile::<2, 2>(g, at),
                        (1, true) => $tile::<1, 2>(g, at),
                        (6, false) => $tile::<6, 1>(g, at),
                        (5, false) => $tile::<5, 1>(g, at),
                        (4, false) => $tile::<4, 1>(g, at),
                        (3, false) => $tile::<3, 1>(g, at),
                        (2, false) => $tile::<2, 1>(g, at),
                        _ => $tile::<1, 1>(g, at),
                    }
                    i0 += r;
                }
                j0 += 2 * $lanes;
            }
        }};
    }

    #[target_feature(enable = "avx512f")]
    /// AVX-512 has 32 registers: tiles of 12 rows by up to two vectors or 6 rows by up to four
    /// (24 accumulators either way), the rows left over in tiles of 8, 4, 2 and 1 (or 4, 2, 1).
    pub(super) unsafe fn gemm512(g: &Gemm, m: usize, n: usize) {
        let mut j0 = 0;
        while j0 < n {
            let w = (n - j0).min(64);
            let v = w.div_ceil(16);
            let mut i0 = 0;
            while i0 < m {
                let sizes: &[usize] = if v <= 2 { &[12, 8, 4, 2, 1] } else { &[6, 4, 2, 1] };
                let r = sizes.iter().copied().find(|&r| r <= m - i0).unwrap_or(1);
                let at = (i0, j0, w);
                match (v, r) {
                    (1, 12) => tile512::<12, 1>(g, at),
                    (1, 8) => tile512::<8, 1>(g, at),
                    (1, 4) => tile512::<4, 1>(g, at),
                    (1, 2) => tile512::<2, 1>(g, at),
                    (1, _) => tile512::<1, 1>(g, at),
                    (2, 12) => tile512::<12, 2>(g, at),
                    (2, 8) => tile512::<8, 2>(g, at),
                    (2, 4) => tile512::<4, 2>(g, at),
                    (2, 2) => tile512::<2, 2>(g, at),
                    (2, _) => tile512::<1, 2>(g, at),
                    (3, 6) => tile512::<6, 3>(g, at),
                    (3, 4) => tile512::<4, 3>(g, at),
                    (3, 2) => tile512::<2, 3>(g, at),
                    (3, _) => tile512::<1, 3>(g, at),
                    (_, 6) => tile512::<6, 4>(g, at),
                    (_, 4) => tile512::<4, 4>(g, at),
                    (_, 2) => tile512::<2, 4>(g, at),
                    (_, _) => tile512::<1, 4>(g, at),
                }
                i0 += r;
            }
            j0 += 16 * v;
        }
    }

    /// Lanes `[0, w)` of a 16-lane vector.
    fn mask16(w: usize) -> __mmask16 {
        if w >= 16 {
            0xffff
        } else {
            ((1u32 << w) - 1) as __mmask16
        }
    }

    /// C[i0..i0+R, j0..j0+w) with R rows and V vectors of 16 lanes (w ≤ 16·V ≤ 64).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<const R: usize, const V: usize>(g: &Gemm, (i0, j0, w): (usize, usize, usize)) {
        let masks = [mask16(w), mask16(w.saturating_sub(16)), mask16(w.saturating_sub(32)), mask16(w.saturating_sub(48))];
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let a = g.a.add(i0 * g.a_rs);
        let b = g.b.add(j0);
        for p in 0..g.k {
            let bp = b.add(p * g.b_rs);
            let mut bv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                bv[v] = _mm512_maskz_loadu_ps(masks[v], bp.add(16 * v));
            }
            let ap = a.add(p * g.a_cs);
            for r in 0..R {
                let x = _mm512_set1_ps(*ap.add(r * g.a_rs));
                for v in 0..V {
                    acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
                }
            }
        }
        let alpha = _mm512_set1_ps(g.alpha);
        for r in 0..R {
            let cp = g.c.add((i0 + r) * g.c_rs + j0);
            for v in 0..V {
                _mm512_mask_storeu_ps(cp.add(16 * v), masks[v], _mm512_mul_ps(acc[r][v], alpha));
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    /// AVX2 has 16 registers: tiles of up to MR rows by up to two vectors.
    pub(super) unsafe fn gemm256(g: &Gemm, m: usize, n: usize) {
        walk!(g, m, n, 8, tile256)
    }

    /// Lanes `[0, w)` of an 8-lane vector, as AVX2's masked loads and stores take it.
    #[target_feature(enable = "avx2")]
    unsafe fn mask8(w: usize) -> __m256i {
        let w = w.min(8) as i32;
        _mm256_cmpgt_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// As [`tile512`] with 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile256<const R: usize, const V: usize>(g: &Gemm, (i0, j0, w): (usize, usize, usize)) {
        let masks = [mask8(w), mask8(w.saturating_sub(8))];
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        let a = g.a.add(i0 * g.a_rs);
        let b = g.b.add(j0);
        for p in 0..g.k {
            let bp = b.add(p * g.b_rs);
            let mut bv = [_mm256_setzero_ps(); V];
            for v in 0..V {
                bv[v] = _mm256_maskload_ps(bp.add(8 * v), masks[v]);
            }
            let ap = a.add(p * g.a_cs);
            for r in 0..R {
                let x = _mm256_set1_ps(*ap.add(r * g.a_rs));
                for v in 0..V {
                    acc[r][v] = _mm256_fmadd_ps(x, bv[v], acc[r][v]);
                }
            }
        }
        let alpha = _mm256_set1_ps(g.alpha);
        for r in 0..R {
            let cp = g.c.add((i0 + r) * g.c_rs + j0);
            for v in 0..V {
                _mm256_maskstore_ps(cp.add(8 * v), masks[v], _mm256_mul_ps(acc[r][v], alpha));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the machine has, against the scalar loops (same summation order, so equal to
    /// the bit), over ragged shapes, transposed A and strided C.
    #[test]
    fn vector_kernels_equal_the_loops() {
        let mut seed = 1u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for &(m, n, k) in
            &[(1, 1, 1), (6, 32, 32), (7, 33, 5), (13, 47, 17), (12, 128, 32), (5, 16, 0), (20, 9, 40), (27, 70, 9), (11, 50, 3)]
        {
            for &transposed in &[false, true] {
                let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                let (a_rs, a_cs) = if transposed { (1, m) } else { (k, 1) };
                let b_rs = n + 3;
                let b: Vec<f32> = (0..k * b_rs).map(|_| rnd()).collect();
                let c_rs = n + 2;
                let mut want = vec![7.0f32; m * c_rs];
                let mut got = want.clone();
                let g = |c: *mut f32| Gemm { k, c, c_rs, a: a.as_ptr(), a_rs, a_cs, b: b.as_ptr(), b_rs, alpha: 0.25 };
                unsafe {
                    scalar(&g(want.as_mut_ptr()), m, n);
                    small_gemm(m, n, k, got.as_mut_ptr(), c_rs, a.as_ptr(), a_rs, a_cs, b.as_ptr(), b_rs, 0.25);
                }
                assert_eq!(want, got, "m {m} n {n} k {k} transposed {transposed}");
                // The padding columns of C were never written.
                assert!((0..m).all(|i| want[i * c_rs + n..(i + 1) * c_rs].iter().all(|&x| x == 7.0)));
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    let mut avx2 = vec![7.0f32; m * c_rs];
                    unsafe { x86::gemm256(&g(avx2.as_mut_ptr()), m, n) };
                    assert_eq!(want, avx2, "AVX2: m {m} n {n} k {k} transposed {transposed}");
                }
            }
        }
    }
}
