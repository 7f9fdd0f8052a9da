//! A mixture's experts' products on the CPU (`Backend::matmul_forward_segments` and
//! `matmul_backward_segments`): views are checked and read on the calling thread, then every
//! product runs as its own task on the pool, single-threaded. Small products split over the
//! threads one after another spend more on the split than they gain.

use super::{disjoint, kernels, profile, CpuBackend, CpuBuf, V};
use crate::backend::Segment;
use rayon::prelude::*;

impl CpuBackend {
    pub(super) fn forward_segments(&self, segments: &[Segment<'_, CpuBuf>], c: usize, oc: usize) {
        let _p = profile::op_named(|| format!("matmul_forward_segments {c}->{oc}"));
        // Views are checked and read on this thread; the products then run side by side, one
        // segment per task, each single-threaded (small products split over the threads in turn
        // spend more on the split than they gain).
        let ops: Vec<_> = segments
            .iter()
            .map(|s| {
                disjoint(&s.out, &[&s.inp, &s.w]);
                assert!(s.out.len == s.rows * oc && s.inp.len == s.rows * c && s.w.len == oc * c, "matmul_forward_segments: shapes");
                let (inp, w) = unsafe { (self.operand(self.rd(s.inp)), self.operand(self.rd(s.w))) };
                (kernels::SendPtr(unsafe { self.wr(s.out) }.as_mut_ptr()), inp, w, s.rows)
            })
            .collect();
        let jobs: Vec<_> =
            ops.iter().map(|(out, inp, w, rows)| (*out, kernels::SendConst(inp.as_ptr()), kernels::SendConst(w.as_ptr()), *rows)).collect();
        // SAFETY: each job writes its own `out` view (disjoint from its inputs, checked above).
        jobs.par_iter()
            .for_each(|(out, inp, w, rows)| unsafe { kernels::matmul_forward_nobias_seq(out.get(), inp.get(), w.get(), *rows, c, oc) });
    }

    pub(super) fn backward_segments(&self, segments: &[Segment<'_, CpuBuf>], dinp: &[V], dw: &[V], c: usize, oc: usize) {
        let _p = profile::op_named(|| format!("matmul_backward_segments {c}->{oc}"));
        assert!(segments.len() == dinp.len() && segments.len() == dw.len(), "matmul_backward_segments: one dinp and dw per segment");
        let mut ops = Vec::with_capacity(segments.len());
        for ((s, di), dw) in segments.iter().zip(dinp).zip(dw) {
            disjoint(di, &[dw, &s.out, &s.inp, &s.w]);
            disjoint(dw, &[&s.out, &s.inp, &s.w]);
            assert!(s.out.len == s.rows * oc && s.inp.len == s.rows * c && s.w.len == oc * c && di.len == s.rows * c && dw.len == oc * c);
            let (dout, inp, w) = unsafe { (self.operand(self.rd(s.out)), self.operand(self.rd(s.inp)), self.operand(self.rd(s.w))) };
            let (di, dw) = unsafe { (kernels::SendPtr(self.wr(*di).as_mut_ptr()), kernels::SendPtr(self.wr(*dw).as_mut_ptr())) };
            ops.push((di, dw, dout, inp, w, s.rows));
        }
        // Two products per segment (its input and its weight gradient), all side by side.
        let jobs: Vec<_> = ops
            .iter()
            .flat_map(|(di, dw, dout, inp, w, n)| {
                let (dout, inp, w) = (kernels::SendConst(dout.as_ptr()), kernels::SendConst(inp.as_ptr()), kernels::SendConst(w.as_ptr()));
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
}
