//! The residual add fused with the norm after it (`Backend::residual_layernorm_forward`,
//! `residual_rmsnorm_forward`): each row of res = x + α·y is written and normalised while it is
//! in cache, one pass over the rows instead of an add over the whole tensor and then the norm's
//! pass. The arithmetic is the ops' own (the same bits as running them in turn).

use super::kernels::layernorm_row;
use super::llama::rmsnorm_row;
use super::{disjoint, CpuBackend, V};
use rayon::prelude::*;

/// One row of res = x + α·y, as `Backend::add` (α = 1) or copy + `axpby` (1·x + α·y) compute it.
#[inline]
fn residual_row(res: &mut [f32], x: &[f32], y: &[f32], alpha: f32) {
    if alpha == 1.0 {
        res.iter_mut().zip(x).zip(y).for_each(|((r, &a), &b)| *r = a + b);
    } else {
        res.iter_mut().zip(x).zip(y).for_each(|((r, &a), &b)| *r = 1.0 * a + alpha * b);
    }
}

impl CpuBackend {
    /// [`residual_row`], then the LayerNorm of the row; (mean, rstd) kept per row.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn residual_layernorm(&self, res: V, out: V, mean: V, rstd: V, x: V, y: V, alpha: f32, w: V, b: V, n: usize, c: usize) {
        let _p = self.op("residual_layernorm_forward");
        for o in [&res, &out, &mean, &rstd] {
            disjoint(o, &[&x, &y, &w, &b]);
        }
        disjoint(&res, &[&out, &mean, &rstd]);
        disjoint(&out, &[&mean, &rstd]);
        disjoint(&mean, &[&rstd]);
        assert!(
            [res.len, out.len, x.len, y.len] == [n * c; 4] && mean.len >= n && rstd.len >= n && w.len == c && b.len == c,
            "residual_layernorm_forward: shapes"
        );
        let (res, out, mean, rstd) = unsafe { (self.wr(res), self.wr(out), self.wr(mean), self.wr(rstd)) };
        let (x, y, w, b) = unsafe { (self.rd(x), self.rd(y), self.rd(w), self.rd(b)) };
        let rows = res.par_chunks_mut(c).zip(out.par_chunks_mut(c)).zip(mean[..n].par_iter_mut().zip(rstd[..n].par_iter_mut()));
        rows.enumerate().for_each(|(r, ((rr, o), (m, s)))| {
            residual_row(rr, &x[r * c..(r + 1) * c], &y[r * c..(r + 1) * c], alpha);
            (*m, *s) = layernorm_row(o, rr, w, b);
        });
    }

    /// [`residual_row`], then the RMSNorm of the row; rstd kept per row.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn residual_rmsnorm(&self, res: V, out: V, rstd: V, x: V, y: V, alpha: f32, w: V, n: usize, c: usize, eps: f32) {
        let _p = self.op("residual_rmsnorm_forward");
        for o in [&res, &out, &rstd] {
            disjoint(o, &[&x, &y, &w]);
        }
        disjoint(&res, &[&out, &rstd]);
        disjoint(&out, &[&rstd]);
        assert!([res.len, out.len, x.len, y.len] == [n * c; 4] && rstd.len >= n && w.len == c, "residual_rmsnorm_forward: shapes");
        let (res, out, rstd) = unsafe { (self.wr(res), self.wr(out), self.wr(rstd)) };
        let (x, y, w) = unsafe { (self.rd(x), self.rd(y), self.rd(w)) };
        res.par_chunks_mut(c).zip(out.par_chunks_mut(c)).zip(rstd[..n].par_iter_mut()).enumerate().for_each(|(r, ((rr, o), s))| {
            residual_row(rr, &x[r * c..(r + 1) * c], &y[r * c..(r + 1) * c], alpha);
            *s = rmsnorm_row(o, rr, w, eps);
        });
    }
}
