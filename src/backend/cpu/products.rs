//! The CPU backend's matrix products (`Backend::gemm`, `matmul_forward`, `matmul_backward`) and
//! the fused product + GELU of the MLP: views are checked and read here, the math is in
//! `kernels`.

use super::{disjoint, fused, kernels, narrow, CpuBackend, V};
use crate::backend::{Backend, Trans};

impl CpuBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_products(&self, c: V, a: V, ta: Trans, b: V, tb: Trans, m: usize, n: usize, k: usize, alpha: f32, beta: f32) {
        let _p = self.op_named(|| format!("gemm {m}x{k} @ {k}x{n}"));
        disjoint(&c, &[&a, &b]);
        assert!(c.len >= m * n && a.len >= m * k && b.len >= k * n, "gemm: views too small for ({m},{n},{k})");
        let (a, b) = unsafe { (self.operand(self.rd(a)), self.operand(self.rd(b))) };
        let (c, a, b) = unsafe { (self.wr(c).as_mut_ptr(), a.as_ptr(), b.as_ptr()) };
        // Row-major strides; a transposed operand is the same memory read with swapped strides.
        let (a_rs, a_cs) = match ta {
            Trans::N => (k as isize, 1),
            Trans::T => (1, m as isize),
        };
        let (b_rs, b_cs) = match tb {
            Trans::N => (n as isize, 1),
            Trans::T => (1, k as isize),
        };
        unsafe { kernels::gemm_raw_par(m, n, k, c, n as isize, 1, a, a_rs, a_cs, b, b_rs, b_cs, beta, alpha, true) }
    }

    pub(super) fn forward_product(&self, out: V, inp: V, w: V, b: Option<V>, n: usize, c: usize, oc: usize) {
        let _p = self.op_named(|| format!("matmul_forward {c}->{oc}"));
        disjoint(&out, &[&inp, &w]);
        if let Some(b) = b.as_ref() {
            disjoint(&out, &[b]);
        }
        assert!(out.len == n * oc && inp.len == n * c && w.len == oc * c, "matmul_forward: shapes");
        let (inp, w) = unsafe { (self.operand(self.rd(inp)), self.operand(self.rd(w))) };
        // A few output columns (a router): every row's dot products at once, no packing.
        if (1..=narrow::MAX_OC).contains(&oc) {
            return unsafe { narrow::forward(self.wr(out), &inp, &w, b.map(|b| self.rd(b)), n, c, oc) };
        }
        // By blocks side by side, each single-threaded: against one product split over the
        // threads (2 cores, isolated), demo shapes 10-20% faster (128 -> 384, 128 and 256), 124M
        // shapes 3-50% (768 -> 50304 the least, 3072 -> 768 the most).
        unsafe { fused::matmul_forward_blocks(None, self.wr(out), &inp, &w, b.map(|b| self.rd(b)), n, c, oc) }
    }

    /// pre = inp @ w^T + b, out = gelu(pre), by blocks that stay in cache between the two.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_product_gelu(&self, out: V, pre: V, inp: V, w: V, b: Option<V>, n: usize, c: usize, oc: usize) {
        let _p = self.op_named(|| format!("matmul_forward_gelu {c}->{oc}"));
        disjoint(&out, &[&pre, &inp, &w]);
        disjoint(&pre, &[&inp, &w]);
        if let Some(b) = b.as_ref() {
            disjoint(&out, &[b]);
            disjoint(&pre, &[b]);
        }
        assert!(out.len == n * oc && pre.len == n * oc && inp.len == n * c && w.len == oc * c, "matmul_forward_gelu: shapes");
        let (inp, w) = unsafe { (self.operand(self.rd(inp)), self.operand(self.rd(w))) };
        unsafe { fused::matmul_forward_gelu(self.wr(out), self.wr(pre), &inp, &w, b.map(|b| self.rd(b)), n, c, oc) }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_product(&self, dinp: Option<V>, dw: V, db: Option<V>, dout: V, inp: V, w: V, n: usize, c: usize, oc: usize) {
        self.backward_product_to(dinp, false, dw, db, dout, inp, w, n, c, oc)
    }

    /// `Backend::matmul_backward_add`: a narrow product adds its dinp in place (the same bits:
    /// each element's product, then one addition); others go through `scratch`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_product_add(
        &self,
        dinp: V,
        scratch: V,
        dw: V,
        db: Option<V>,
        dout: V,
        inp: V,
        w: V,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        if (1..=narrow::MAX_OC).contains(&oc) {
            return self.backward_product_to(Some(dinp), true, dw, db, dout, inp, w, n, c, oc);
        }
        self.backward_product_to(Some(scratch), false, dw, db, dout, inp, w, n, c, oc);
        Backend::add_assign(self, dinp, scratch);
    }

    /// dinp (written, or added to with `add`: narrow products only), dw and db.
    #[allow(clippy::too_many_arguments)]
    fn backward_product_to(&self, dinp: Option<V>, add: bool, dw: V, db: Option<V>, dout: V, inp: V, w: V, n: usize, c: usize, oc: usize) {
        let _p = self.op_named(|| format!("matmul_backward {c}->{oc}"));
        if let Some(d) = dinp.as_ref() {
            disjoint(d, &[&dw, &dout, &inp, &w]);
            if let Some(db) = db.as_ref() {
                disjoint(d, &[db]);
            }
        }
        disjoint(&dw, &[&dout, &inp, &w]);
        if let Some(db) = db.as_ref() {
            disjoint(db, &[&dw, &dout, &inp, &w]);
        }
        assert!(dout.len == n * oc && inp.len == n * c && w.len == oc * c && dw.len == oc * c, "matmul_backward: shapes");
        // The bias gradient sums dout in fp32 (it is no product); the products read rounded
        // operands in bf16/tf32.
        if let Some(db) = db {
            unsafe { kernels::bias_backward(self.wr(db), self.rd(dout), n, oc) }
        }
        let (dout, inp, w) = unsafe { (self.operand(self.rd(dout)), self.operand(self.rd(inp)), self.operand(self.rd(w))) };
        if (1..=narrow::MAX_OC).contains(&oc) {
            return unsafe { narrow::backward(dinp.map(|d| self.wr(d)), add, self.wr(dw), &dout, &inp, &w, n, c, oc) };
        }
        assert!(!add, "matmul_backward: adding dinp in place takes a narrow product");
        unsafe { kernels::matmul_backward(dinp.map(|d| self.wr(d)), self.wr(dw), None, &dout, &inp, &w, n, c, oc) }
    }

    /// dpre = gelu'(pre) ⊙ (dout @ w), dw += dout^T @ act, db += column sums of dout; dout @ w
    /// never leaves cache before its GELU derivative is applied.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_product_gelu(
        &self,
        dpre: V,
        dw: V,
        db: Option<V>,
        dout: V,
        act: V,
        w: V,
        pre: V,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        let _p = self.op_named(|| format!("matmul_backward_gelu {c}->{oc}"));
        disjoint(&dpre, &[&dw, &dout, &act, &w, &pre]);
        disjoint(&dw, &[&dout, &act, &w, &pre]);
        if let Some(db) = db.as_ref() {
            disjoint(&dpre, &[db]);
            disjoint(db, &[&dw, &dout, &act, &w, &pre]);
        }
        assert!(
            dpre.len == n * c && pre.len == n * c && act.len == n * c && dout.len == n * oc && w.len == oc * c && dw.len == oc * c,
            "matmul_backward_gelu: shapes"
        );
        if let Some(db) = db {
            unsafe { kernels::bias_backward(self.wr(db), self.rd(dout), n, oc) }
        }
        let (dout, act, w) = unsafe { (self.operand(self.rd(dout)), self.operand(self.rd(act)), self.operand(self.rd(w))) };
        unsafe { fused::matmul_backward_gelu(self.wr(dpre), self.wr(dw), &dout, &act, &w, self.rd(pre), n, c, oc) }
    }
}
