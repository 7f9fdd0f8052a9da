//! CPU kernels on plain slices: the math of every op, forward and backward, llm.c style.
//!
//! Each function mirrors one `Backend` op. Rows are processed in parallel on the global rayon
//! pool; reductions over rows (bias and LayerNorm parameter gradients) are split by columns so
//! that no two threads write the same element and results do not depend on the thread count
//! (bitwise reproducible training on CPU).

use super::wide::wide;
use rayon::prelude::*;

/// Raw gemm call: dst (m, n) = dst_scale * dst + prod_scale * lhs @ rhs, with explicit strides.
/// `parallel = false` inside tasks that are already spread over the pool (attention runs one
/// small product per (batch, head)).
pub(crate) unsafe fn gemm_raw_par(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    dst_scale: f32,
    prod_scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let read_dst = dst_scale != 0.0;
    // Small products are faster single-threaded than with rayon's fork/join overhead.
    let par = if parallel && m * n * k >= 64 * 64 * 64 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    gemm::gemm(
        m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, dst_scale, prod_scale, false, false, false, par,
    );
}

/// Elements per rayon task for elementwise kernels: big enough that scheduling is noise.
pub(super) const CHUNK: usize = 1 << 14;
/// Rows per rayon task for row-wise kernels.
const ROWS: usize = 64;

/// A raw pointer that may cross into rayon tasks; each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// A read-only raw pointer that may cross into rayon tasks.
#[derive(Clone, Copy)]
pub(super) struct SendConst(pub(super) *const f32);
unsafe impl Send for SendConst {}
unsafe impl Sync for SendConst {}

impl SendConst {
    pub(super) fn get(&self) -> *const f32 {
        self.0
    }
}

impl SendPtr {
    /// The pointer, through a method so that a closure captures the whole (Send) wrapper rather
    /// than the raw pointer field alone (edition 2021 captures disjoint fields).
    pub(super) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Sum with 8 independent accumulators: the compiler keeps them in one SIMD register (a plain
/// `iter().sum()` is a serial dependency chain it may not reorder). The summation order is fixed,
/// so results are reproducible.
#[inline]
pub fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in rest {
        s += v;
    }
    s
}

/// Dot product with 8 accumulators (see [`sum8`]).
#[inline]
pub fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let full = n / 8 * 8;
    for (ca, cb) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += ca[k] * cb[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in full..n {
        s += a[i] * b[i];
    }
    s
}

/// Maximum with 8 lanes (exact: max is order-independent).
#[inline]
pub fn max8(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let mut m = acc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    for &v in rest {
        m = m.max(v);
    }
    m
}

wide! {
    /// x[i] = e^(x[i] - shift), returning the sum (vectorised exp, then [`sum8`]).
    pub(super) fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        for v in x.iter_mut() {
            *v = fast_exp(*v - shift);
        }
        sum8(x)
    }
}

pub fn add(dst: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(dst.len() == a.len() && a.len() == b.len(), "add: lengths differ");
    dst.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((d, a), b)| {
        for ((x, &y), &z) in d.iter_mut().zip(a).zip(b) {
            *x = y + z;
        }
    });
}

pub fn axpby(dst: &mut [f32], alpha: f32, beta: f32, src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "axpby: lengths differ");
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (x, &y) in d.iter_mut().zip(s) {
            *x = alpha * *x + beta * y;
        }
    });
}

pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK).for_each(|d| d.iter_mut().for_each(|v| *v *= s));
}

/// Sum of squares in f64. Chunked so the summation order is fixed, whatever the thread count.
pub fn sumsq(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).collect();
    partial.iter().sum()
}

// ----------------------------------------------------------------------------------------------
// matmul

/// out (N, OC) = inp (N, C) @ w^T on this thread (no bias): one segment of a grouped product.
///
/// SAFETY: `out` holds N·OC floats, `inp` N·C and `w` OC·C, and `out` overlaps neither.
pub unsafe fn matmul_forward_nobias_seq(out: *mut f32, inp: *const f32, w: *const f32, n: usize, c: usize, oc: usize) {
    gemm_raw_par(n, oc, c, out, oc as isize, 1, inp, c as isize, 1, w, 1, c as isize, 0.0, 1.0, false)
}

/// dinp (N, C) = dout (N, OC) @ w (OC, C), overwritten, on this thread. SAFETY: as
/// [`matmul_forward_nobias_seq`].
pub unsafe fn matmul_dinp_seq(dinp: *mut f32, dout: *const f32, w: *const f32, n: usize, c: usize, oc: usize) {
    gemm_raw_par(n, c, oc, dinp, c as isize, 1, dout, oc as isize, 1, w, c as isize, 1, 0.0, 1.0, false)
}

/// dw (OC, C) = beta · dw + dout^T (OC, N) @ inp (N, C) (beta 1 accumulates, 0 overwrites
/// without reading dw); dout^T has row stride 1, column stride OC.
/// SAFETY: as [`matmul_forward_nobias_seq`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_dw(dw: *mut f32, beta: f32, dout: *const f32, inp: *const f32, n: usize, c: usize, oc: usize, parallel: bool) {
    gemm_raw_par(oc, c, n, dw, c as isize, 1, dout, 1, oc as isize, inp, c as isize, 1, beta, 1.0, parallel)
}

/// The fewest rows for which [`matmul_backward`] splits both products by halves of the rows,
/// and the largest weight (floats) whose second half-gradient it buffers.
const SPLIT_ROWS: usize = 1024;
const SPLIT_MAX_WEIGHT: usize = 1 << 22;

/// Scratch buffers of the products (a split backward's second half-gradient, the narrow
/// backward's partials): one per call in flight (actors run their ops side by side on the
/// pool), reused.
static SPARE: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// Run `f` on `len` floats of scratch lent from [`SPARE`] (contents unspecified: `f` writes
/// before it reads), then take the buffer back.
pub(super) fn with_spare<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut g = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
    if g.len() < len {
        g.resize(len, 0.0);
    }
    let r = f(&mut g[..len]);
    SPARE.lock().unwrap_or_else(|e| e.into_inner()).push(g);
    r
}

pub fn matmul_backward(
    dinp: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    c: usize,
    oc: usize,
) {
    let (dw_ptr, dout_ptr, inp_ptr) = (SendPtr(dw.as_mut_ptr()), SendConst(dout.as_ptr()), SendConst(inp.as_ptr()));
    // SAFETY (both products): the slices' lengths are the shapes' (the backend checks them) and
    // dinp, dw and the inputs are distinct slices.
    let weight_grad = |parallel: bool| unsafe { matmul_dw(dw_ptr.get(), 1.0, dout_ptr.get(), inp_ptr.get(), n, c, oc, parallel) };
    match dinp {
        // Many rows: two tasks of equal work, each with half the rows of both products; the
        // second half's weight gradient goes to a buffer of its own and is added after (the
        // order fixed by the shape, not the thread count). Against the two products side by
        // side, whose FLOPs are equal but whose speeds are not: 4-9% faster on the demo's
        // shapes (2 cores, isolated, best of 15).
        Some(dinp) if n >= SPLIT_ROWS && oc * c <= SPLIT_MAX_WEIGHT => {
            let h = n / 2;
            let (dinp_ptr, w_ptr) = (SendPtr(dinp.as_mut_ptr()), SendConst(w.as_ptr()));
            with_spare(oc * c, |g| {
                let gp = SendPtr(g.as_mut_ptr());
                // SAFETY: the halves write disjoint rows of dinp; the first adds into dw, the
                // second overwrites g (β = 0); the inputs are read only, their lengths the shapes'.
                rayon::join(
                    || unsafe {
                        matmul_dinp_seq(dinp_ptr.get(), dout_ptr.get(), w_ptr.get(), h, c, oc);
                        matmul_dw(dw_ptr.get(), 1.0, dout_ptr.get(), inp_ptr.get(), h, c, oc, false);
                    },
                    || unsafe {
                        matmul_dinp_seq(dinp_ptr.get().add(h * c), dout_ptr.get().add(h * oc), w_ptr.get(), n - h, c, oc);
                        matmul_dw(gp.get(), 0.0, dout_ptr.get().add(h * oc), inp_ptr.get().add(h * c), n - h, c, oc, false);
                    },
                );
                dw.iter_mut().zip(g.iter()).for_each(|(d, &x)| *d += x);
            });
        }
        // The two products have the same FLOPs (2·N·C·OC) and write different memory: each on
        // one thread, side by side, beats each split over the threads in turn (measured on the
        // demo and 124M shapes, 2 cores: 0-15% faster).
        Some(dinp) => {
            let (dinp_ptr, w_ptr) = (SendPtr(dinp.as_mut_ptr()), SendConst(w.as_ptr()));
            let input_grad = || unsafe { matmul_dinp_seq(dinp_ptr.get(), dout_ptr.get(), w_ptr.get(), n, c, oc) };
            rayon::join(input_grad, || weight_grad(false));
        }
        None => weight_grad(true),
    }
    if let Some(db) = db {
        bias_backward(db, dout, n, oc);
    }
}

/// db (OC) += sum over rows of dout (N, OC); split by columns so each element has one writer.
pub fn bias_backward(db: &mut [f32], dout: &[f32], n: usize, oc: usize) {
    const COLS: usize = 64;
    db.par_chunks_mut(COLS).enumerate().for_each(|(ci, dbc)| {
        let o0 = ci * COLS;
        for r in 0..n {
            let row = &dout[r * oc + o0..r * oc + o0 + dbc.len()];
            for (d, &g) in dbc.iter_mut().zip(row) {
                *d += g;
            }
        }
    });
}

// ----------------------------------------------------------------------------------------------
// embedding

pub fn encoder_forward(out: &mut [f32], ids: &[u32], wte: &[f32], wpe: Option<&[f32]>, b: usize, t: usize, c: usize) {
    assert!(ids.len() >= b * t && out.len() == b * t * c, "encoder_forward: shapes");
    out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
        let ix = ids[r] as usize;
        let pos = r % t;
        let we = &wte[ix * c..ix * c + c];
        match wpe {
            Some(wpe) => {
                let pe = &wpe[pos * c..pos * c + c];
                for i in 0..c {
                    o[i] = we[i] + pe[i];
                }
            }
            None => o.copy_from_slice(we),
        }
    });
}

pub fn encoder_backward(dwte: &mut [f32], mut dwpe: Option<&mut [f32]>, dout: &[f32], ids: &[u32], b: usize, t: usize, c: usize) {
    // Serial on purpose: two rows with the same token write the same dwte row. This is
    // O(B*T*C) adds, negligible beside any matrix product.
    for r in 0..b * t {
        let ix = ids[r] as usize;
        let pos = r % t;
        let d = &dout[r * c..r * c + c];
        for i in 0..c {
            dwte[ix * c + i] += d[i];
        }
        if let Some(dwpe) = dwpe.as_deref_mut() {
            for i in 0..c {
                dwpe[pos * c + i] += d[i];
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------
// layernorm

pub fn layernorm_forward(out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], inp: &[f32], w: &[f32], b: &[f32], n: usize, c: usize) {
    assert!(out.len() == n * c && mean.len() >= n && rstd.len() >= n, "layernorm_forward: shapes");
    out.par_chunks_mut(c).zip(mean.par_iter_mut()).zip(rstd.par_iter_mut()).enumerate().for_each(|(r, ((o, m), s))| {
        (*m, *s) = layernorm_row(o, &inp[r * c..r * c + c], w, b);
    });
}

/// One row of [`layernorm_forward`]: o = (x − mean) · rstd · w + b; returns (mean, rstd).
#[inline]
pub fn layernorm_row(o: &mut [f32], x: &[f32], w: &[f32], b: &[f32]) -> (f32, f32) {
    const EPS: f32 = 1e-5;
    let c = x.len();
    let mu = sum8(x) / c as f32;
    // o as scratch for the centred values, then the affine map in place
    for (oi, &xi) in o.iter_mut().zip(x) {
        *oi = xi - mu;
    }
    let var = dot8(o, o) / c as f32;
    let rs = 1.0 / (var + EPS).sqrt();
    for ((oi, &wi), &bi) in o.iter_mut().zip(w).zip(b) {
        *oi = *oi * rs * wi + bi;
    }
    (mu, rs)
}

pub fn layernorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    assert!(dinp.len() == n * c && dout.len() == n * c && inp.len() == n * c && w.len() == c && dw.len() == c && db.len() == c);
    // One pass over the rows: dinp += (w·dout − mean(w·dout) − norm · mean(w·dout·norm)) · rstd,
    // and each block of ROWS rows sums its own share of dw (norm·dout) and db (dout). The blocks'
    // partial sums are then added in block order, so the result is the same whatever the number
    // of threads (and whichever thread ran a block).
    let blocks = n.div_ceil(ROWS);
    let mut partial = vec![0.0f32; blocks * 2 * c];
    dinp.par_chunks_mut(c * ROWS).zip(partial.par_chunks_mut(2 * c)).enumerate().for_each(|(bi, (dblock, part))| {
        let (pw, pb) = part.split_at_mut(c);
        let mut norm = vec![0.0f32; c];
        let mut dnorm = vec![0.0f32; c];
        for (k, di) in dblock.chunks_mut(c).enumerate() {
            let r = bi * ROWS + k;
            let x = &inp[r * c..r * c + c];
            let d = &dout[r * c..r * c + c];
            let (mu, rs) = (mean[r], rstd[r]);
            for ((((nm, dn), &xi), &di), &wi) in norm.iter_mut().zip(dnorm.iter_mut()).zip(x).zip(d).zip(w) {
                *nm = (xi - mu) * rs;
                *dn = wi * di;
            }
            let dnorm_mean = sum8(&dnorm) / c as f32;
            let dnorm_norm_mean = dot8(&dnorm, &norm) / c as f32;
            for ((((o, &dn), &nm), &dd), (pwi, pbi)) in di.iter_mut().zip(&dnorm).zip(&norm).zip(d).zip(pw.iter_mut().zip(pb.iter_mut())) {
                *o += (dn - dnorm_mean - nm * dnorm_norm_mean) * rs;
                *pwi += nm * dd;
                *pbi += dd;
            }
        }
    });
    // Columns in parallel, blocks in order: one writer per element of dw and db.
    const COLS: usize = 64;
    dw.par_chunks_mut(COLS).zip(db.par_chunks_mut(COLS)).enumerate().for_each(|(ci, (dwc, dbc))| {
        let c0 = ci * COLS;
        for part in partial.chunks_exact(2 * c) {
            let (pw, pb) = (&part[c0..c0 + dwc.len()], &part[c + c0..c + c0 + dbc.len()]);
            for ((d, &p), (e, &q)) in dwc.iter_mut().zip(pw).zip(dbc.iter_mut().zip(pb)) {
                *d += p;
                *e += q;
            }
        }
    });
}

/// e^x in f32 without a libm call, so loops over it vectorise: Cephes' expf polynomial after
/// the reduction x = n·ln2 + r, |r| ≤ ln2/2. Relative error ≲ 2e-7 over the clamped range.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    // round to nearest with the 1.5·2^23 trick (no call, vectorises)
    let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0;
    // Fused multiply-adds: one rounding each and half the instructions of a multiply then an add.
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5e-1);
    let e = (p * r).mul_add(r, r) + 1.0;
    // 2^n from n's bits. SAFETY: the clamp keeps n in [-126, 127], an exact i32. (A plain `as`
    // conversion saturates, and its vector form stopped this loop from vectorising.)
    e * f32::from_bits(((unsafe { n.to_int_unchecked::<i32>() } + 127) << 23) as u32)
}

/// tanh through [`fast_exp`]: 1 − 2/(e^{2x} + 1). Absolute error ≲ 1e-7 (relative error grows
/// only where tanh itself is tiny, which GELU multiplies by x anyway).
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    let x = x.clamp(-9.0, 9.0); // tanh(±9) = ±1 to f32 precision
    1.0 - 2.0 / (fast_exp(2.0 * x) + 1.0)
}

// ----------------------------------------------------------------------------------------------
// gelu (tanh approximation)

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2/pi)

/// d gelu(x) / dx.
#[inline(always)]
pub(super) fn gelu_grad(x: f32) -> f32 {
    let th = fast_tanh(GELU_SCALE * (0.044715 * x * x).mul_add(x, x));
    let sech2 = th.mul_add(-th, 1.0);
    0.5 * (1.0 + th) + x * 0.5 * sech2 * GELU_SCALE * (3.0 * 0.044715 * x).mul_add(x, 1.0)
}

#[inline(always)]
pub(super) fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + fast_tanh(GELU_SCALE * (0.044715 * v * v).mul_add(v, v)))
}

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len(), "gelu_forward: lengths differ");
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, x)| gelu_forward_chunk(o, x));
}

wide! {
    fn gelu_forward_chunk(o: &mut [f32], x: &[f32]) {
        for (oi, &v) in o.iter_mut().zip(x) {
            *oi = gelu(v);
        }
    }
}

pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    assert!(dinp.len() == inp.len() && inp.len() == dout.len(), "gelu_backward: lengths differ");
    dinp.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .for_each(|((di, xs), ds)| gelu_backward_chunk(di, xs, ds));
}

wide! {
    fn gelu_backward_chunk(di: &mut [f32], xs: &[f32], ds: &[f32]) {
        for ((o, &x), &d) in di.iter_mut().zip(xs).zip(ds) {
            *o = gelu_grad(x) * d;
        }
    }
}

// ----------------------------------------------------------------------------------------------
// fused softmax + cross-entropy

pub fn crossentropy(logits: &mut [f32], losses: &mut [f32], targets: &[u32], dscale: f32, n: usize, v: usize, vp: usize) {
    assert!(logits.len() == n * vp && losses.len() >= n && targets.len() >= n, "crossentropy: shapes");
    logits.par_chunks_mut(vp).zip(losses.par_iter_mut()).enumerate().for_each(|(r, (row, loss))| {
        let tgt = targets[r] as usize;
        assert!(tgt < v, "target id {tgt} at row {r} is outside the vocabulary of {v}");
        *loss = crossentropy_row(row, tgt, v, dscale);
    });
}

wide! {
    /// One row's loss; the row becomes its gradient (dscale · (softmax − one-hot)).
    fn crossentropy_row(row: &mut [f32], tgt: usize, v: usize, dscale: f32) -> f32 {
        let real = &mut row[..v];
        let maxv = max8(real);
        let sum = exp_shifted_sum(real, maxv);
        let inv = 1.0 / sum;
        let loss = -(real[tgt] * inv).ln();
        for x in real.iter_mut() {
            *x *= inv * dscale;
        }
        real[tgt] -= dscale;
        // padded columns: masked out of the softmax, zero gradient
        row[v..].fill(0.0);
        loss
    }
}

// ----------------------------------------------------------------------------------------------
// optimizer kernels

pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], lr: f32, b1: f32, b2: f32, eps: f32, wd: f32, t: u64) {
    let (rbc1, rbc2) = (1.0 / (1.0 - b1.powi(t as i32)), 1.0 / (1.0 - b2.powi(t as i32)));
    // Zipped slices (no indexing) so the loop vectorises: AdamW is memory-bound, 7 streams.
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((pc, mc), vc), gc)| adamw_chunk(pc, mc, vc, gc, [lr, b1, b2, eps, wd, rbc1, rbc2]));
}

wide! {
    /// `h` = [lr, β1, β2, ε, weight decay, 1/(1 − β1^t), 1/(1 − β2^t)].
    fn adamw_chunk(pc: &mut [f32], mc: &mut [f32], vc: &mut [f32], gc: &[f32], h: [f32; 7]) {
        let [lr, b1, b2, eps, wd, rbc1, rbc2] = h;
        for (((pi, mi), vi), &gi) in pc.iter_mut().zip(mc.iter_mut()).zip(vc.iter_mut()).zip(gc) {
            *mi = b1 * *mi + (1.0 - b1) * gi;
            *vi = b2 * *vi + (1.0 - b2) * gi * gi;
            *pi -= lr * ((*mi * rbc1) / ((*vi * rbc2).sqrt() + eps) + wd * *pi);
        }
    }
}

pub fn momentum(u: &mut [f32], m: &mut [f32], g: &[f32], mu: f32, nesterov: bool) {
    let nest = if nesterov { 1.0f32 } else { 0.0 };
    u.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|((uc, mc), gc)| {
        for ((ui, mi), &gi) in uc.iter_mut().zip(mc.iter_mut()).zip(gc) {
            *mi = mu * *mi + gi;
            // Nesterov: u = g + mu m; plain: u = m (written branch-free so the loop vectorises)
            *ui = nest * (gi + mu * *mi) + (1.0 - nest) * *mi;
        }
    });
}

/// p = keep * p - step * u
pub fn apply_update(p: &mut [f32], u: &[f32], step: f32, keep: f32) {
    p.par_chunks_mut(CHUNK).zip(u.par_chunks(CHUNK)).for_each(|(pc, uc)| {
        for (pi, &ui) in pc.iter_mut().zip(uc) {
            *pi = keep * *pi - step * ui;
        }
    });
}
