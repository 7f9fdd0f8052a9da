//! A mixture's experts' products on the CPU (`Backend::matmul_forward_segments`, its gathered
//! form, `matmul_backward_segments` and `moe_combine_backward_segments`): views are checked and
//! read on the calling thread, then every product runs as its own task on the pool,
//! single-threaded. Small products split over the threads one after another spend more on the
//! split than they gain.
//!
//! Where an expert's operand is made from other rows, its task makes it just before its
//! products, so that they read it from cache rather than from memory: its gathered tokens into
//! its rows of xs (the backward reads them again), its dout from the combine's backward into a
//! tile ([`TILE_MAX`]; dys is then left unwritten).

use super::{disjoint, kernels, llama, CpuBackend, CpuBuf, CpuIds, V};
use crate::backend::{Backend, MoeCombine, Precision, Segment};
use kernels::{SendConst, SendPtr};
use rayon::prelude::*;

/// The most floats of an expert's dout that its task makes in a tile of the pool's spare memory
/// (1 MiB: within a core's L2 beside the products' packing); a larger one goes to its rows of
/// dys. Measured: the tile beats the rows of dys by a little at the MoE demo's shapes.
pub const TILE_MAX: usize = 1 << 18;

/// A grouped product's input rows gathered from `x` (C wide) by `rows` into `xs`, whose view
/// starts at `xs_off`.
#[derive(Clone, Copy)]
struct Gathered<'a> {
    x: &'a [f32],
    rows: &'a [u32],
    xs: SendPtr,
    xs_off: usize,
}

impl Gathered<'_> {
    /// Gathered rows [s0, s0 + r) into their rows of xs, then `f` on them.
    ///
    /// SAFETY: rows [s0, s0 + r) of `xs` are the calling task's alone.
    unsafe fn with(&self, s0: usize, r: usize, c: usize, f: impl FnOnce(*const f32)) {
        let xs = self.xs.get().add(s0 * c);
        for (i, &row) in self.rows[s0..s0 + r].iter().enumerate() {
            std::slice::from_raw_parts_mut(xs.add(i * c), c).copy_from_slice(&self.x[row as usize * c..(row as usize + 1) * c]);
        }
        f(xs)
    }
}

impl CpuBackend {
    /// The rows of `whole` (rows of `width`) that the segments cover, checking that `view` of
    /// each is the next rows, from row 0 on (a segment's first row is then its view's offset
    /// into `whole` over `width`).
    fn segment_rows<'a>(
        segments: &[Segment<'a, CpuBuf>],
        whole: &V,
        width: usize,
        view: fn(&Segment<'a, CpuBuf>) -> V<'a>,
        op: &str,
    ) -> usize {
        segments.iter().fold(0, |next, s| {
            let v = view(s);
            assert!(
                std::ptr::eq(v.buf, whole.buf)
                    && v.off.wrapping_sub(whole.off) == next * width
                    && v.len == s.rows * width
                    && v.len <= whole.len - next * width,
                "{op}: each segment's view must be the next rows of the buffer (row {next})"
            );
            next + s.rows
        })
    }

    pub(super) fn forward_segments(&self, segments: &[Segment<'_, CpuBuf>], c: usize, oc: usize) {
        let _p = self.op_named(|| format!("matmul_forward_segments {c}->{oc}"));
        self.forward_jobs(segments, None, c, oc)
    }

    /// `Backend::matmul_forward_segments_gathered`: each segment's task gathers its rows of xs,
    /// then runs its product on them while they are in cache. The same bits as the two ops in
    /// turn, which is how products that read rounded operands (bf16, TF32) run.
    pub(super) fn forward_segments_gathered(&self, segments: &[Segment<'_, CpuBuf>], xs: V, x: V, rows: &CpuIds, c: usize, oc: usize) {
        let op = "matmul_forward_segments_gathered";
        let m = Self::segment_rows(segments, &xs, c, |s| s.inp, op);
        if Backend::precision(self) != Precision::Fp32 {
            Backend::gather_rows(self, xs, x, rows, m, c);
            return self.forward_segments(segments, c, oc);
        }
        let _p = self.op_named(|| format!("gather_rows+matmul_forward_segments {c}->{oc}"));
        disjoint(&xs, &[&x]);
        for s in segments {
            disjoint(&s.out, &[&xs, &x]);
        }
        let (x, rows) = unsafe { (self.rd(x), rows.slice()) };
        assert!(rows.len() >= m, "{op}: {} row ids for {m} rows", rows.len());
        if let Some(&r) = rows[..m].iter().find(|&&r| (r as usize + 1) * c > x.len()) {
            panic!("{op}: row id {r} outside an input of {} rows", x.len() / c);
        }
        let g = Gathered { x, rows: &rows[..m], xs: SendPtr(unsafe { self.wr(xs) }.as_mut_ptr()), xs_off: xs.off };
        self.forward_jobs(segments, Some(g), c, oc)
    }

    /// The grouped forward's products side by side, each on its segment's input (read, or
    /// gathered in its task).
    fn forward_jobs(&self, segments: &[Segment<'_, CpuBuf>], g: Option<Gathered>, c: usize, oc: usize) {
        // Views are checked and read on this thread; the products then run side by side, one
        // segment per task, each single-threaded.
        let ops: Vec<_> = segments
            .iter()
            .map(|s| {
                disjoint(&s.out, &[&s.inp, &s.w]);
                assert!(s.out.len == s.rows * oc && s.inp.len == s.rows * c && s.w.len == oc * c, "matmul_forward_segments: shapes");
                let inp = g.is_none().then(|| unsafe { self.operand(self.rd(s.inp)) });
                let w = unsafe { self.operand(self.rd(s.w)) };
                (SendPtr(unsafe { self.wr(s.out) }.as_mut_ptr()), inp, w, s.rows, g.map_or(0, |g| (s.inp.off - g.xs_off) / c))
            })
            .collect();
        let jobs: Vec<_> = ops
            .iter()
            .map(|(out, inp, w, rows, s0)| (*out, inp.as_ref().map(|x| SendConst(x.as_ptr())), SendConst(w.as_ptr()), *rows, *s0))
            .collect();
        // SAFETY: each job writes its own `out` view (disjoint from its inputs, checked above)
        // and its own rows of xs.
        jobs.par_iter().for_each(|(out, inp, w, rows, s0)| unsafe {
            let product = |inp: *const f32| kernels::matmul_forward_nobias_seq(out.get(), inp, w.get(), *rows, c, oc);
            match (inp, g) {
                (Some(inp), _) => product(inp.get()),
                (None, Some(g)) => g.with(*s0, *rows, c, product),
                (None, None) => unreachable!("a segment's input is read or gathered"),
            }
        });
    }

    pub(super) fn backward_segments(&self, segments: &[Segment<'_, CpuBuf>], dinp: &[V], dw: &[V], c: usize, oc: usize) {
        let _p = self.op_named(|| format!("matmul_backward_segments {c}->{oc}"));
        assert!(segments.len() == dinp.len() && segments.len() == dw.len(), "matmul_backward_segments: one dinp and dw per segment");
        let mut ops = Vec::with_capacity(segments.len());
        for ((s, di), dw) in segments.iter().zip(dinp).zip(dw) {
            disjoint(di, &[dw, &s.out, &s.inp, &s.w]);
            disjoint(dw, &[&s.out, &s.inp, &s.w]);
            assert!(s.out.len == s.rows * oc && s.inp.len == s.rows * c && s.w.len == oc * c && di.len == s.rows * c && dw.len == oc * c);
            let (dout, inp, w) = unsafe { (self.operand(self.rd(s.out)), self.operand(self.rd(s.inp)), self.operand(self.rd(s.w))) };
            let (di, dw) = unsafe { (SendPtr(self.wr(*di).as_mut_ptr()), SendPtr(self.wr(*dw).as_mut_ptr())) };
            ops.push((di, dw, dout, inp, w, s.rows));
        }
        // Two products per segment (its input and its weight gradient), all side by side.
        let jobs: Vec<_> = ops
            .iter()
            .flat_map(|(di, dw, dout, inp, w, n)| {
                let (dout, inp, w) = (SendConst(dout.as_ptr()), SendConst(inp.as_ptr()), SendConst(w.as_ptr()));
                [(true, *di, dout, w, *n), (false, *dw, dout, inp, *n)]
            })
            .collect();
        // SAFETY: every job writes its own dinp or dw view, checked disjoint from its inputs.
        jobs.par_iter().for_each(|(input, dst, dout, other, n)| unsafe {
            match input {
                true => kernels::matmul_dinp_seq(dst.get(), dout.get(), other.get(), *n, c, oc),
                false => kernels::matmul_dw(dst.get(), 1.0, dout.get(), other.get(), *n, c, oc, false),
            }
        });
    }

    /// `Backend::moe_combine_backward_segments`: each expert's task makes its rows of dout
    /// (w · dout[t]) and their dweights, then runs both its products on them while they are in
    /// cache. The same arithmetic as the two ops in turn, so the same bits. Products that read
    /// rounded operands (bf16, TF32) run in turn.
    pub(super) fn combine_backward_segments(
        &self,
        segments: &[Segment<'_, CpuBuf>],
        dinp: &[V],
        dw: &[V],
        comb: MoeCombine<'_, Self>,
        f: usize,
        c: usize,
    ) {
        let MoeCombine { dys, dweights, dout, ys, slots, weights, n, k } = comb;
        if Backend::precision(self) != Precision::Fp32 {
            Backend::moe_combine_backward(self, dys, dweights, dout, ys, slots, weights, n, k, c);
            return self.backward_segments(segments, dinp, dw, f, c);
        }
        let _p = self.op_named(|| format!("moe_combine_backward+matmul_backward_segments {f}->{c}"));
        let m = n * k;
        let op = "moe_combine_backward_segments";
        assert!(segments.len() == dinp.len() && segments.len() == dw.len(), "{op}: one dinp and dw per segment");
        assert!(
            dys.len >= m * c && dweights.len >= m && dout.len >= n * c && ys.len >= m * c && weights.len >= m && slots.slice().len() >= m,
            "{op}: shapes"
        );
        for o in [&dys, &dweights] {
            disjoint(o, &[&dout, &ys, &weights]);
        }
        disjoint(&dys, &[&dweights]);
        // Each segment's dout is its rows of dys, in order, the segments covering all M.
        let covered = Self::segment_rows(segments, &dys, c, |s| s.out, op);
        assert!(covered == m, "{op}: the segments cover {covered} of the {m} slots");
        let mut jobs = Vec::with_capacity(segments.len());
        for ((s, di), dw) in segments.iter().zip(dinp).zip(dw) {
            for o in [di, dw] {
                disjoint(o, &[&s.inp, &s.w, &dys, &dweights, &dout, &ys, &weights]);
            }
            disjoint(di, &[dw]);
            disjoint(&dys, &[&s.inp, &s.w]);
            disjoint(&dweights, &[&s.inp, &s.w]);
            assert!(s.inp.len == s.rows * f && s.w.len == c * f && di.len == s.rows * f && dw.len == c * f, "{op}: segment shapes");
            let (h, w) = unsafe { (SendConst(self.rd(s.inp).as_ptr()), SendConst(self.rd(s.w).as_ptr())) };
            let (di, dw) = unsafe { (SendPtr(self.wr(*di).as_mut_ptr()), SendPtr(self.wr(*dw).as_mut_ptr())) };
            jobs.push(((s.out.off - dys.off) / c, s.rows, di, dw, h, w));
        }
        let (dout, ys, weights, slots) = unsafe { (self.rd(dout), self.rd(ys), self.rd(weights), slots.slice()) };
        let (dys, dweights) = unsafe { (SendPtr(self.wr(dys).as_mut_ptr()), SendPtr(self.wr(dweights).as_mut_ptr())) };
        llama::with_slot_owners(slots, m, |owners| {
            // SAFETY: the slots are a permutation (checked): slot s's row of dys and its owner's
            // dweight are this segment's alone; every view was checked for shape and overlap.
            jobs.par_iter().for_each(|(s0, rows, di, dw, h, w)| unsafe {
                // Its dout in a tile up to TILE_MAX floats, else in its own rows of dys.
                let tiled = rows * c <= TILE_MAX;
                kernels::with_spare(if tiled { rows * c } else { 0 }, |tile| {
                    let g = if tiled { tile.as_mut_ptr() } else { dys.get().add(s0 * c) };
                    for i in 0..*rows {
                        let s = s0 + i;
                        let tj = owners[s] as usize;
                        let d = &dout[tj / k * c..(tj / k + 1) * c];
                        *dweights.get().add(tj) = kernels::dot8(d, &ys[s * c..(s + 1) * c]);
                        let row = std::slice::from_raw_parts_mut(g.add(i * c), c);
                        row.iter_mut().zip(d).for_each(|(o, &x)| *o = weights[tj] * x);
                    }
                    // Its input gradient and its weight gradient side by side.
                    let g = SendConst(g);
                    rayon::join(
                        || kernels::matmul_dinp_seq(di.get(), g.get(), w.get(), *rows, f, c),
                        || kernels::matmul_dw(dw.get(), 1.0, g.get(), h.get(), *rows, f, c, false),
                    );
                })
            })
        });
    }
}
