//! CPU kernels of the LLaMA/Qwen block's ops: RMSNorm, rotary positions, grouped-query
//! key/value sharing and SwiGLU (the GPT-2 ops are in `kernels`). Rows in parallel over rayon,
//! as there.

use super::kernels::{dot8, fast_exp, SendPtr};
use super::wide::wide;
use rayon::prelude::*;

/// out = x · rstd · w per row, rstd = 1 / sqrt(mean(x²) + eps); rstd (N) is kept for backward.
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], inp: &[f32], w: &[f32], n: usize, c: usize, eps: f32) {
    assert!(out.len() == n * c && rstd.len() >= n && inp.len() == n * c && w.len() == c, "rmsnorm_forward: shapes");
    out.par_chunks_mut(c).zip(rstd.par_iter_mut()).enumerate().for_each(|(r, (o, s))| {
        *s = rmsnorm_row(o, &inp[r * c..r * c + c], w, eps);
    });
}

/// One row of [`rmsnorm_forward`]: o = x · rstd · w; returns rstd.
#[inline]
pub fn rmsnorm_row(o: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
    let rs = 1.0 / (dot8(x, x) / x.len() as f32 + eps).sqrt();
    for ((oi, &xi), &wi) in o.iter_mut().zip(x).zip(w) {
        *oi = xi * rs * wi;
    }
    rs
}

/// dinp += (w·dout − norm · mean(w·dout·norm)) · rstd, norm = x · rstd; dw += Σ_rows norm · dout.
/// One pass over the rows; each block of ROWS rows sums its share of dw, and the blocks' sums are
/// added in block order (the same result whatever the number of threads).
pub fn rmsnorm_backward(dinp: &mut [f32], dw: &mut [f32], dout: &[f32], inp: &[f32], w: &[f32], rstd: &[f32], n: usize, c: usize) {
    assert!(dinp.len() == n * c && dw.len() == c && dout.len() == n * c && inp.len() == n * c && w.len() == c && rstd.len() >= n);
    let mut partial = vec![0.0f32; n.div_ceil(ROWS) * c];
    dinp.par_chunks_mut(c * ROWS).zip(partial.par_chunks_mut(c)).enumerate().for_each(|(bi, (dblock, pw))| {
        for (k, di) in dblock.chunks_mut(c).enumerate() {
            let r = bi * ROWS + k;
            let (x, d, rs) = (&inp[r * c..r * c + c], &dout[r * c..r * c + c], rstd[r]);
            // mean over the row of (w·dout)·norm
            let m = dot3(w, d, x) * rs / c as f32;
            for ((((o, &wi), &di), &xi), p) in di.iter_mut().zip(w).zip(d).zip(x).zip(pw.iter_mut()) {
                *o += (wi * di - xi * rs * m) * rs;
                *p += xi * rs * di;
            }
        }
    });
    for part in partial.chunks_exact(c) {
        for (d, &p) in dw.iter_mut().zip(part) {
            *d += p;
        }
    }
}

/// Σ a·b·c with 8 accumulators (a fixed order, vectorised; see `kernels::sum8`).
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let full = a.len() / 8 * 8;
    for ((x, y), z) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)).zip(c[..full].chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += x[k] * y[k] * z[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in full..a.len() {
        s += a[i] * b[i] * c[i];
    }
    s
}

/// Per-head RMSNorm (QK-norm): the first `heads` vectors of `hd` floats of each of `rows` rows
/// of `stride` floats become x · rstd · w; rstd (rows · heads) is kept.
pub fn head_rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    rows: usize,
    stride: usize,
    heads: usize,
    hd: usize,
    eps: f32,
) {
    assert!(
        heads * hd <= stride && out.len() >= (rows - 1) * stride + heads * hd && inp.len() >= (rows - 1) * stride + heads * hd,
        "head_rmsnorm_forward: shapes"
    );
    assert!(rstd.len() >= rows * heads && w.len() == hd, "head_rmsnorm_forward: shapes");
    out.par_chunks_mut(stride).zip(rstd.par_chunks_mut(heads)).take(rows).enumerate().for_each(|(r, (o, s))| {
        for h in 0..heads {
            let x = &inp[r * stride + h * hd..r * stride + (h + 1) * hd];
            let rs = 1.0 / (dot8(x, x) / hd as f32 + eps).sqrt();
            for ((oi, &xi), &wi) in o[h * hd..(h + 1) * hd].iter_mut().zip(x).zip(w) {
                *oi = xi * rs * wi;
            }
            s[h] = rs;
        }
    });
}

/// The backward of [`head_rmsnorm_forward`], in place on `d` (dout in, dinp out, per vector:
/// (w·dout − norm · mean(w·dout·norm)) · rstd); dw += Σ_vectors norm · dout, summed first, in
/// row and head order.
pub fn head_rmsnorm_backward(
    d: &mut [f32],
    dw: &mut [f32],
    inp: &[f32],
    w: &[f32],
    rstd: &[f32],
    rows: usize,
    stride: usize,
    heads: usize,
    hd: usize,
) {
    assert!(heads * hd <= stride && d.len() >= (rows - 1) * stride + heads * hd && rstd.len() >= rows * heads && dw.len() == hd);
    for r in 0..rows {
        for h in 0..heads {
            let o = r * stride + h * hd;
            let rs = rstd[r * heads + h];
            for i in 0..hd {
                dw[i] += inp[o + i] * rs * d[o + i];
            }
        }
    }
    d.par_chunks_mut(stride).take(rows).enumerate().for_each(|(r, dr)| {
        for h in 0..heads {
            let x = &inp[r * stride + h * hd..r * stride + (h + 1) * hd];
            let dv = &mut dr[h * hd..(h + 1) * hd];
            let rs = rstd[r * heads + h];
            let mut acc = 0.0f32;
            for i in 0..hd {
                acc += w[i] * dv[i] * x[i] * rs;
            }
            let m = acc / hd as f32;
            for i in 0..hd {
                dv[i] = (w[i] * dv[i] - x[i] * rs * m) * rs;
            }
        }
    });
}

/// out (M, C)[i] = inp[rows[i]].
pub fn gather_rows(out: &mut [f32], inp: &[f32], rows: &[u32], m: usize, c: usize) {
    assert!(out.len() >= m * c && rows.len() >= m, "gather_rows: shapes");
    out[..m * c].par_chunks_mut(c).zip(&rows[..m]).for_each(|(o, &r)| o.copy_from_slice(&inp[r as usize * c..(r as usize + 1) * c]));
}

/// out (N, C)[t] = Σ_j w[t, j] · ys[slots[t, j]], choices in order (w = 1 without weights).
pub fn moe_combine(out: &mut [f32], ys: &[f32], slots: &[u32], weights: Option<&[f32]>, n: usize, k: usize, c: usize) {
    assert!(out.len() >= n * c && slots.len() >= n * k, "moe_combine: shapes");
    out[..n * c].par_chunks_mut(c).enumerate().for_each(|(t, o)| {
        if k == 0 {
            o.fill(0.0);
        }
        for j in 0..k {
            let s = slots[t * k + j] as usize;
            let w = weights.map_or(1.0, |w| w[t * k + j]);
            let y = &ys[s * c..(s + 1) * c];
            // The first choice starts the sum from zero (0 + w·y, as a zeroed row would), in the
            // same pass.
            match j {
                0 => o.iter_mut().zip(y).for_each(|(oi, &y)| *oi = 0.0 + w * y),
                _ => o.iter_mut().zip(y).for_each(|(oi, &y)| *oi += w * y),
            }
        }
    });
}

thread_local! {
    /// Each slot's (token, choice) for [`with_slot_owners`], per calling thread (reused: no
    /// allocation per call).
    static OWNERS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Run `f` on each slot's owner, the (token, choice) index t·k + j whose slot it is
/// (`owners[slots[tj]] = tj`, M = N·k slots). The slots must be a permutation of 0..M (each
/// (t, j) owns its row of the slots' buffers), which is checked first.
pub fn with_slot_owners<R>(slots: &[u32], m: usize, f: impl FnOnce(&[u32]) -> R) -> R {
    // Taken out while in use: a nested call (a pool thread running another op while it waits)
    // finds it empty and grows its own.
    let mut owners = OWNERS.take();
    owners.clear();
    owners.resize(m, u32::MAX);
    for (tj, &s) in slots[..m].iter().enumerate() {
        let s = s as usize;
        assert!(
            s < m && owners[s] == u32::MAX,
            "moe_combine_backward: slot {s} out of range or repeated (slots must be a permutation of 0..{m})"
        );
        owners[s] = tj as u32;
    }
    let r = f(&owners);
    OWNERS.set(owners);
    r
}

/// dys[slots[t, j]] = w[t, j] · dout[t]; dweights[t, j] = dout[t] · ys[slots[t, j]]. Tokens run
/// side by side on the pool; the slots must be distinct (each (t, j) owns its row of dys),
/// which is checked first.
#[allow(clippy::too_many_arguments)]
pub fn moe_combine_backward(
    dys: &mut [f32],
    dweights: &mut [f32],
    dout: &[f32],
    ys: &[f32],
    slots: &[u32],
    weights: &[f32],
    n: usize,
    k: usize,
    c: usize,
) {
    let m = n * k;
    assert!(dys.len() >= m * c && dweights.len() >= m && slots.len() >= m && weights.len() >= m, "moe_combine_backward: shapes");
    with_slot_owners(slots, m, |_| ());
    let out = SendPtr(dys.as_mut_ptr());
    dweights[..m].par_chunks_mut(ROWS * k).enumerate().for_each(|(bi, dw)| {
        for (jj, dwj) in dw.iter_mut().enumerate() {
            let tj = bi * ROWS * k + jj;
            let (t, s) = (tj / k, slots[tj] as usize);
            let d = &dout[t * c..(t + 1) * c];
            *dwj = dot8(d, &ys[s * c..(s + 1) * c]);
            // SAFETY: the slots are a permutation (checked above): row s of dys is this (t, j)'s
            // alone, and it lies within dys's m rows.
            let row = unsafe { std::slice::from_raw_parts_mut(out.get().add(s * c), c) };
            for (o, &g) in row.iter_mut().zip(d) {
                *o = weights[tj] * g;
            }
        }
    });
}

/// The angle of rotary pair `i` (of hd / 2) at position `pos`: pos · θ^(−2i / hd).
fn rope_angle(pos: usize, i: usize, hd: usize, theta: f32) -> (f32, f32) {
    let inv = (theta as f64).powf(-2.0 * i as f64 / hd as f64);
    let a = pos as f64 * inv;
    (a.cos() as f32, a.sin() as f32)
}

/// Rotary positions, in place, on the first `heads` heads (of size `hd`) of every row of `x`
/// (rows of `stride` floats; row r is position r mod t): the pairs (i, i + hd/2) of a head are
/// rotated by pos · θ^(−2i/hd) (the Hugging Face `rotate_half` layout). `sign` −1 rotates back
/// (the backward: the rotation is orthogonal, so dx = Rᵀ dy).
pub fn rope(x: &mut [f32], rows: usize, t: usize, stride: usize, heads: usize, hd: usize, theta: f32, sign: f32) {
    assert!(hd.is_multiple_of(2) && heads * hd <= stride && x.len() >= rows * stride, "rope: shapes");
    let half = hd / 2;
    let table = rope_table(t.min(rows), hd, theta);
    x[..rows * stride].par_chunks_mut(stride * ROWS).enumerate().for_each(|(bi, block)| {
        for (k, row) in block.chunks_mut(stride).enumerate() {
            let pos = (bi * ROWS + k) % t;
            let angles = &table[pos * half..(pos + 1) * half];
            for h in 0..heads {
                let (lo, hi) = row[h * hd..(h + 1) * hd].split_at_mut(half);
                for ((x0, x1), &(cos, sin)) in lo.iter_mut().zip(hi.iter_mut()).zip(angles) {
                    let (a, b, sin) = (*x0, *x1, sin * sign);
                    *x0 = a * cos - b * sin;
                    *x1 = b * cos + a * sin;
                }
            }
        }
    });
}

/// The (cos, sin) of every (position, pair) for `t` positions: t·hd/2 angles, computed once per
/// shape and kept (the same f64 formula as [`rope_angle`], so the same f32 values).
fn rope_table(t: usize, hd: usize, theta: f32) -> std::sync::Arc<Vec<(f32, f32)>> {
    type Table = ((usize, usize, u32), std::sync::Arc<Vec<(f32, f32)>>);
    static LAST: std::sync::Mutex<Vec<Table>> = std::sync::Mutex::new(Vec::new());
    let key = (t, hd, theta.to_bits());
    let mut cache = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, tab)) = cache.iter().find(|(k, _)| *k == key) {
        return tab.clone();
    }
    let half = hd / 2;
    let tab = std::sync::Arc::new((0..t * half).map(|k| rope_angle(k / half, k % half, hd, theta)).collect::<Vec<_>>());
    if cache.len() >= 8 {
        cache.remove(0);
    }
    cache.push((key, tab.clone()));
    tab
}

/// Grouped-query attention's shared keys and values: out (N, 3·nh·hd) = [q | k | v] where
/// query head h reads key/value head h / (nh / kv), from inp (N, (nh + 2·kv)·hd) = [q | k | v].
pub fn gqa_expand(out: &mut [f32], inp: &[f32], n: usize, nh: usize, kv: usize, hd: usize) {
    let (wi, wo, g) = ((nh + 2 * kv) * hd, 3 * nh * hd, nh / kv);
    assert!(nh.is_multiple_of(kv) && out.len() == n * wo && inp.len() == n * wi, "gqa_expand: shapes");
    out.par_chunks_mut(wo).enumerate().for_each(|(r, o)| {
        let x = &inp[r * wi..(r + 1) * wi];
        o[..nh * hd].copy_from_slice(&x[..nh * hd]);
        for h in 0..nh {
            let j = h / g;
            for (part, src) in [(1, nh * hd + j * hd), (2, (nh + kv) * hd + j * hd)] {
                let dst = part * nh * hd + h * hd;
                o[dst..dst + hd].copy_from_slice(&x[src..src + hd]);
            }
        }
    });
}

/// The adjoint of [`gqa_expand`]: dinp (N, (nh + 2·kv)·hd) = [dq | Σ_group dk | Σ_group dv]
/// (overwritten), the group's query heads summed in order.
pub fn gqa_reduce(dinp: &mut [f32], dout: &[f32], n: usize, nh: usize, kv: usize, hd: usize) {
    let (wi, wo, g) = ((nh + 2 * kv) * hd, 3 * nh * hd, nh / kv);
    assert!(nh.is_multiple_of(kv) && dout.len() == n * wo && dinp.len() == n * wi, "gqa_reduce: shapes");
    dinp.par_chunks_mut(wi).enumerate().for_each(|(r, d)| {
        let y = &dout[r * wo..(r + 1) * wo];
        d[..nh * hd].copy_from_slice(&y[..nh * hd]);
        d[nh * hd..].fill(0.0);
        for h in 0..nh {
            let j = h / g;
            for (part, dst) in [(1, nh * hd + j * hd), (2, (nh + kv) * hd + j * hd)] {
                let src = part * nh * hd + h * hd;
                for k in 0..hd {
                    d[dst + k] += y[src + k];
                }
            }
        }
    });
}

/// σ(x) through [`fast_exp`], so the loops over it vectorise.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// Rows per rayon task of the row-wise kernels here.
const ROWS: usize = 32;

/// out (N, F) = silu(gate) · up, inp (N, 2F) = [gate | up] per row.
pub fn swiglu_forward(out: &mut [f32], inp: &[f32], n: usize, f: usize) {
    assert!(out.len() == n * f && inp.len() == 2 * n * f, "swiglu_forward: shapes");
    out.par_chunks_mut(f * ROWS).zip(inp.par_chunks(2 * f * ROWS)).for_each(|(ob, ib)| swiglu_forward_rows(ob, ib, f));
}

wide! {
    fn swiglu_forward_rows(ob: &mut [f32], ib: &[f32], f: usize) {
        for (o, x) in ob.chunks_mut(f).zip(ib.chunks(2 * f)) {
            let (g, u) = x.split_at(f);
            for ((oi, &gi), &ui) in o.iter_mut().zip(g).zip(u) {
                *oi = gi * sigmoid(gi) * ui;
            }
        }
    }
}

/// dinp (N, 2F) = [dgate | dup] (written, not accumulated): dup = silu(g) · dout,
/// dgate = dout · u · σ(g) · (1 + g · (1 − σ(g))).
pub fn swiglu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32], n: usize, f: usize) {
    assert!(dinp.len() == 2 * n * f && inp.len() == 2 * n * f && dout.len() == n * f, "swiglu_backward: shapes");
    dinp.par_chunks_mut(2 * f * ROWS)
        .zip(inp.par_chunks(2 * f * ROWS))
        .zip(dout.par_chunks(f * ROWS))
        .for_each(|((db, ib), ob)| swiglu_backward_rows(db, ib, ob, f));
}

wide! {
    fn swiglu_backward_rows(db: &mut [f32], ib: &[f32], ob: &[f32], f: usize) {
        for ((di, x), d) in db.chunks_mut(2 * f).zip(ib.chunks(2 * f)).zip(ob.chunks(f)) {
            let (g, u) = x.split_at(f);
            let (dg, du) = di.split_at_mut(f);
            for ((((dgi, dui), &gi), &ui), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(d) {
                let sg = sigmoid(gi);
                *dui = gi * sg * d;
                *dgi = d * ui * sg * (1.0 + gi * (1.0 - sg));
            }
        }
    }
}
