//! The MLP's product and GELU fused on the CPU (`Backend::matmul_forward_gelu` and
//! `matmul_backward_gelu`): the products run by blocks, single-threaded and side by side on the
//! pool, and each block's GELU (or its derivative) is applied while the block is still in cache,
//! instead of a second pass over an (N, 4C) tensor from memory. Plain forward products run by
//! the same blocks.

use super::kernels::{gelu, gelu_grad, gemm_raw_par, SendConst, SendPtr};
use super::wide::wide;
use rayon::prelude::*;

/// Rows and columns of a block of a forward product over an inner dimension of `c`: its product
/// and activation (2 · 256 · 512 or 2 · 1024 · 192 floats, 1-1.5 MiB) stay in a core's L2 cache
/// between the two passes. Over a long inner dimension, blocks of 192 columns: at GPT-2 124M's
/// shapes (2 cores, isolated) 3072 -> 768 ran at 150-170 GFLOP/s by `gemm`'s own threads and
/// 240-250 by these blocks, 768 -> 768 at 190 against 270, 768 -> 2304 at 240 against 280.
fn block_shape(c: usize) -> (usize, usize) {
    // (The backward's blocks of dpre keep 256 × 512: `FUSED_ROWS`, `FUSED_COLS`.)
    match c <= 256 {
        true => (256, 512),
        false => (1024, 192),
    }
}

/// pre (N, OC) = inp (N, C) @ w^T + b and out = gelu(pre), by blocks of rows and columns: each
/// block's product (single-threaded, blocks side by side on the pool) is followed at once by its
/// bias and GELU while it is still in cache, instead of a second pass over pre from memory. The
/// blocks depend on the shape alone, so the result does not depend on the number of threads.
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward_gelu(out: &mut [f32], pre: &mut [f32], inp: &[f32], w: &[f32], b: Option<&[f32]>, n: usize, c: usize, oc: usize) {
    assert!(out.len() == n * oc);
    matmul_forward_blocks(Some(out), pre, inp, w, b, n, c, oc)
}

/// pre (N, OC) = inp (N, C) @ w^T + b, and out = gelu(pre) where `out` is given, by blocks
/// (as [`matmul_forward_gelu`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward_blocks(
    out: Option<&mut [f32]>,
    pre: &mut [f32],
    inp: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    assert!(pre.len() == n * oc && inp.len() == n * c && w.len() == oc * c, "matmul_forward: shapes");
    let (fr, fc) = block_shape(c);
    let (row_blocks, col_blocks) = (n.div_ceil(fr), oc.div_ceil(fc));
    let o = out.map(|o| SendPtr(o.as_mut_ptr()));
    let (p, x, wp) = (SendPtr(pre.as_mut_ptr()), SendConst(inp.as_ptr()), SendConst(w.as_ptr()));
    (0..row_blocks * col_blocks).into_par_iter().for_each(|blk| {
        let (i0, j0) = ((blk / col_blocks) * fr, (blk % col_blocks) * fc);
        let (rows, cols) = (fr.min(n - i0), fc.min(oc - j0));
        // SAFETY: block (i0, j0) writes only rows [i0, i0 + rows) × columns [j0, j0 + cols) of
        // pre and out, which no other block touches; the shapes were checked above.
        unsafe {
            let pb = p.get().add(i0 * oc + j0);
            gemm_raw_par(
                rows,
                cols,
                c,
                pb,
                oc as isize,
                1,
                x.get().add(i0 * c),
                c as isize,
                1,
                wp.get().add(j0 * c),
                1,
                c as isize,
                0.0,
                1.0,
                false,
            );
            for r in 0..rows {
                let pr = std::slice::from_raw_parts_mut(pb.add(r * oc), cols);
                let or = o.as_ref().map(|o| std::slice::from_raw_parts_mut(o.get().add((i0 + r) * oc + j0), cols));
                bias_gelu_row(or, pr, b.map(|b| &b[j0..j0 + cols]));
            }
        }
    });
}

/// Rows and columns of a block of dpre in [`matmul_backward_gelu`]: the product and its GELU
/// derivative's operand (1 MiB) stay in L2.
const FUSED_ROWS: usize = 256;
const FUSED_COLS: usize = 512;

/// Columns of a block of the weight gradient in [`matmul_backward_gelu`]. Each block re-packs
/// dout^T: at GPT-2 124M's shape, blocks of 128 columns made the op 12% slower than the plain
/// backward of the same FLOPs; at 512 they are within 3% (demo shape: no change).
const DW_COLS: usize = 512;

thread_local! {
    /// One weight-gradient block of [`matmul_backward_gelu`] (OC × DW_COLS, by columns), per
    /// pool thread; grown, never shrunk.
    static DW_BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// dpre (N, C) = gelu'(pre) ⊙ (dout (N, OC) @ w (OC, C)) and dw (OC, C) += dout^T @ act (N, C),
/// as independent single-threaded tasks side by side on the pool: blocks of columns of dw, and
/// blocks of dpre, each followed at once by its GELU derivative while it is in cache. The
/// blocks depend on the shape alone (results do not depend on the number of threads).
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_gelu(
    dpre: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    act: &[f32],
    w: &[f32],
    pre: &[f32],
    n: usize,
    c: usize,
    oc: usize,
) {
    assert!(
        dpre.len() == n * c && pre.len() == n * c && act.len() == n * c && dout.len() == n * oc && w.len() == oc * c && dw.len() == oc * c
    );
    let (row_blocks, col_blocks, dw_blocks) = (n.div_ceil(FUSED_ROWS), c.div_ceil(FUSED_COLS), c.div_ceil(DW_COLS));
    let (dp, dwp) = (SendPtr(dpre.as_mut_ptr()), SendPtr(dw.as_mut_ptr()));
    let (d, a, wp, pp) = (SendConst(dout.as_ptr()), SendConst(act.as_ptr()), SendConst(w.as_ptr()), SendConst(pre.as_ptr()));
    // The weight-gradient blocks (the longer tasks) come first.
    (0..dw_blocks + row_blocks * col_blocks).into_par_iter().for_each(|task| unsafe {
        // SAFETY: every task writes its own block of dw or of dpre; the shapes were checked.
        if task < dw_blocks {
            let j0 = task * DW_COLS;
            let cols = DW_COLS.min(c - j0);
            // dw[:, j0..] (OC, cols) += dout^T (OC, N) @ act[:, j0..] (N, cols). gemm runs fastest
            // (~15%, AVX-512, measured at the demo's and GPT-2 124M's shapes) when its output's
            // contiguous dimension is the shorter one: with fewer rows than columns the block is
            // made by columns in a per-thread buffer, then added to dw.
            if oc >= cols {
                let (dst, lhs, rhs) = (dwp.get().add(j0), d.get(), a.get().add(j0));
                gemm_raw_par(oc, cols, n, dst, c as isize, 1, lhs, 1, oc as isize, rhs, c as isize, 1, 1.0, 1.0, false);
                return;
            }
            DW_BLOCK.with(|cell| {
                let mut g = cell.borrow_mut();
                if g.len() < oc * cols {
                    g.resize(oc * cols, 0.0);
                }
                gemm_raw_par(
                    oc,
                    cols,
                    n,
                    g.as_mut_ptr(),
                    1,
                    oc as isize,
                    d.get(),
                    1,
                    oc as isize,
                    a.get().add(j0),
                    c as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                );
                for i in 0..oc {
                    let row = std::slice::from_raw_parts_mut(dwp.get().add(i * c + j0), cols);
                    for (j, x) in row.iter_mut().enumerate() {
                        *x += g[j * oc + i];
                    }
                }
            });
        } else {
            let blk = task - dw_blocks;
            let (i0, j0) = ((blk / col_blocks) * FUSED_ROWS, (blk % col_blocks) * FUSED_COLS);
            let (rows, cols) = (FUSED_ROWS.min(n - i0), FUSED_COLS.min(c - j0));
            let db = dp.get().add(i0 * c + j0);
            // dpre block (rows, cols) = dout[i0..] (rows, OC) @ w[:, j0..] (OC, cols)
            gemm_raw_par(
                rows,
                cols,
                oc,
                db,
                c as isize,
                1,
                d.get().add(i0 * oc),
                oc as isize,
                1,
                wp.get().add(j0),
                c as isize,
                1,
                0.0,
                1.0,
                false,
            );
            for r in 0..rows {
                let dr = std::slice::from_raw_parts_mut(db.add(r * c), cols);
                gelu_backward_in_place(dr, std::slice::from_raw_parts(pp.get().add((i0 + r) * c + j0), cols));
            }
        }
    });
}

wide! {
    /// d = gelu'(x) · d.
    fn gelu_backward_in_place(d: &mut [f32], x: &[f32]) {
        for (di, &xi) in d.iter_mut().zip(x) {
            *di *= gelu_grad(xi);
        }
    }
}

wide! {
    /// pre += b (if any), then out = gelu(pre) (if out is given).
    fn bias_gelu_row(out: Option<&mut [f32]>, pre: &mut [f32], b: Option<&[f32]>) {
        if let Some(b) = b {
            for (p, &bi) in pre.iter_mut().zip(b) {
                *p += bi;
            }
        }
        if let Some(out) = out {
            for (oi, &v) in out.iter_mut().zip(pre.iter()) {
                *oi = gelu(v);
            }
        }
    }
}
