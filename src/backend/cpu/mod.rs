//! The CPU reference backend: `gemm` (on the shared rayon pool) for matrix products, plain loops
//! for everything else.
//!
//! It is synchronous — an op has finished when its call returns — so its "stream" only orders
//! work. Events cannot change a result here, but they are checked: every stream keeps a vector
//! clock and every buffer its last writer and readers ([`order`]), so an access from one stream
//! to memory another stream used, without waiting on an event recorded after that use, panics
//! (on a GPU it would race). It is the reference every other backend is tested against, and
//! the backend of tests and CI, so its kernels are written for clarity first and then made fast
//! where the benchmark says it matters (the matrix products, which are all `gemm`).
//!
//! Memory safety: a [`CpuBuf`] is device-like memory behind an `UnsafeCell`. Ops receive views by
//! shared reference and write through raw pointers, exactly like a GPU kernel. Soundness rests on
//! two facts checked here: `CpuBuf` is `Send` but not `Sync` (one owner thread at a time, so no
//! other thread can observe a write), and every op asserts that its output views do not overlap
//! the other views of the same call ([`disjoint`]), so the `&mut [f32]` it makes never aliases.
//!
//! Parallelism: all CPU work, across every stage actor, runs on the ONE global rayon pool, so two
//! actors never each start a 2-thread GEMM on a 2-core machine.

mod attention;
mod buf;
mod fill;
pub mod flash;
mod fused;
mod kernels;
mod llama;
mod microkernel;
mod narrow;
mod operand;
pub mod order;
mod products;
pub mod profile;
mod residual;
mod segments;
mod storage;
pub mod wide;

use super::{Attention, Backend, MoeCombine, Precision, Segment, StreamMode, Trans};
pub(crate) use buf::disjoint;
use buf::{raw_rd, raw_wr, V};
pub use buf::{CpuBuf, CpuIds};
use std::cell::UnsafeCell;
use std::sync::{Arc, Mutex};

/// The CPU "stream": a device name; all work runs on the global rayon pool.
/// Clones are the same stream; [`Backend::fork`] and [`Backend::open`] make new ones.
#[derive(Clone, Debug)]
pub struct CpuBackend {
    device: String,
    index: u32,
    stream: Arc<order::Stream>,
    /// Precision and attention algorithm, shared by clones (the same stream).
    mode: Arc<StreamMode>,
    /// Buffers for rounded operand copies (tf32/bf16 emulation), reused across ops so that an
    /// emulated step allocates only until the pool holds its largest operands.
    spare: Arc<Mutex<Vec<Vec<f32>>>>,
    /// The open op scopes and the bf16 writes to round at their end (`storage.rs`).
    storage: Arc<buf::Storage>,
}

impl CpuBackend {
    /// A new stream on CPU "device" `index` (several CPU devices stand in for GPUs in tests).
    pub fn new(index: usize) -> Self {
        CpuBackend {
            device: format!("cpu:{index}"),
            index: index as u32,
            stream: Arc::new(order::Stream::new()),
            mode: Arc::new(StreamMode::default()),
            spare: Arc::new(Mutex::new(Vec::new())),
            storage: Arc::default(),
        }
    }

    /// Read-only slice of a view, after checking that this stream may read it now.
    ///
    /// SAFETY: the caller must not hold a mutable slice overlapping it (ops check with [`disjoint`]).
    unsafe fn rd<'a>(&self, v: V<'a>) -> &'a [f32] {
        order::read(&self.stream, &self.device, &mut v.buf.access.borrow_mut());
        raw_rd(v)
    }

    /// Mutable slice of a view, after checking that this stream may write it now.
    ///
    /// SAFETY: as [`CpuBackend::rd`]; the caller guarantees no overlapping slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn wr<'a>(&self, v: V<'a>) -> &'a mut [f32] {
        order::write(&self.stream, &self.device, &mut v.buf.access.borrow_mut());
        if v.buf.bf16 {
            self.note_bf16_write(&v);
        }
        raw_wr(v)
    }

    /// Panic unless `v` lives on this stream's device (the GPU equivalent is an illegal access,
    /// or a silent slow remote read over the interconnect).
    fn here(&self, v: &V, what: &str) {
        assert!(
            v.buf.device == self.index,
            "{what} on {} touches a buffer of cpu:{}: a buffer from another device must be copied in first (copy_peer)",
            self.device,
            v.buf.device
        );
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Backend for CpuBackend {
    type Buf = CpuBuf;
    type Ids = CpuIds;
    type Event = order::CpuEvent;

    fn open(device: &str) -> anyhow::Result<Self> {
        match device.strip_prefix("cpu:").and_then(|i| i.parse::<usize>().ok()) {
            Some(i) => Ok(CpuBackend::new(i)),
            None if device == "cpu" => Ok(CpuBackend::new(0)),
            None => anyhow::bail!("device {device:?} is not a CPU device (expected \"cpu\" or \"cpu:N\")"),
        }
    }
    fn device(&self) -> &str {
        &self.device
    }
    fn fork(&self) -> anyhow::Result<Self> {
        Ok(CpuBackend::new(self.index as usize))
    }
    fn set_precision(&self, p: Precision) -> anyhow::Result<()> {
        self.mode.set_precision(p);
        Ok(())
    }
    fn precision(&self) -> Precision {
        self.mode.precision()
    }
    fn set_attention(&self, a: Attention) -> anyhow::Result<()> {
        self.mode.set_attention(a);
        Ok(())
    }
    fn attention(&self) -> Attention {
        self.mode.attention()
    }

    /// The materialized backward keeps one (b, h)'s dS at a time, in a per-thread T×T buffer: it
    /// needs no scratch from the caller (and so no B·NH·T·T floats per block).
    fn attention_scratch_len(&self, b: usize, t: usize, nh: usize) -> usize {
        match self.attention() {
            Attention::Materialized => 0,
            Attention::Flash => self.attention_state_len(b, t, nh),
        }
    }
    fn alloc(&self, n: usize) -> CpuBuf {
        CpuBuf::new(n, self.index, &self.stream, false)
    }
    fn alloc_act(&self, n: usize) -> CpuBuf {
        CpuBuf::new(n, self.index, &self.stream, self.mode.storage() == Precision::Bf16)
    }
    fn set_storage(&self, p: Precision) -> anyhow::Result<()> {
        match p {
            Precision::Fp32 | Precision::Bf16 => {
                self.mode.set_storage(p);
                Ok(())
            }
            Precision::Tf32 => anyhow::bail!("storage is fp32 or bf16 (tf32 is a compute precision only)"),
        }
    }
    fn storage(&self) -> Precision {
        self.mode.storage()
    }
    fn alloc_ids(&self, n: usize) -> CpuIds {
        CpuIds { data: UnsafeCell::new(vec![0; n]) }
    }
    fn buf_len(buf: &CpuBuf) -> usize {
        buf.len()
    }
    fn ids_len(ids: &CpuIds) -> usize {
        ids.slice().len()
    }
    fn upload(&self, dst: V, src: &[f32]) {
        assert_eq!(dst.len, src.len(), "upload: view of {} from host slice of {}", dst.len, src.len());
        let _p = self.op("upload");
        self.here(&dst, "upload");
        unsafe { self.wr(dst) }.copy_from_slice(src);
    }
    fn upload_ids(&self, dst: &CpuIds, src: &[u32]) {
        let d = unsafe { &mut *dst.data.get() };
        assert_eq!(d.len(), src.len(), "upload_ids: buffer of {} from host slice of {}", d.len(), src.len());
        d.copy_from_slice(src);
    }
    fn download(&self, src: V, dst: &mut [f32]) {
        assert_eq!(src.len, dst.len(), "download: view of {} into host slice of {}", src.len, dst.len());
        self.here(&src, "download");
        dst.copy_from_slice(unsafe { self.rd(src) });
    }
    fn copy(&self, dst: V, src: V) {
        let _p = self.op("copy");
        assert_eq!(dst.len, src.len, "copy: lengths differ");
        self.here(&dst, "copy");
        disjoint(&dst, &[&src]);
        unsafe { self.wr(dst).copy_from_slice(self.rd(src)) };
    }
    fn is_local(&self, buf: &CpuBuf) -> bool {
        buf.device == self.index
    }
    fn copy_peer(&self, dst: V, src: V) {
        let _p = self.op("copy_peer");
        assert_eq!(dst.len, src.len, "copy_peer: lengths differ");
        self.here(&dst, "copy_peer");
        assert!(!std::ptr::eq(dst.buf, src.buf), "copy_peer: source and destination are one buffer");
        // Distinct buffers never overlap, so the two slices cannot alias.
        unsafe { self.wr(dst).copy_from_slice(self.rd(src)) };
    }
    fn fill(&self, dst: V, value: f32) {
        let _p = self.op("fill");
        self.here(&dst, "fill");
        unsafe { fill::fill(self.wr(dst), value) }
    }
    fn zero_grads(&self, dst: V) {
        let _p = self.op("zero_grads");
        self.here(&dst, "zero_grads");
        unsafe { fill::fill_past_cache(self.wr(dst), 0.0, fill::GRADS_STREAM_MIN) }
    }
    fn record(&self) -> order::CpuEvent {
        self.stream.record()
    }
    fn wait(&self, event: &order::CpuEvent) {
        self.stream.wait(event)
    }
    fn synchronize(&self) {}
    fn within<R>(&self, f: impl FnOnce() -> R) -> R {
        if rayon::current_thread_index().is_some() {
            return f();
        }
        // SAFETY: `rayon::scope` runs the closure on a worker of the global pool and returns only
        // once it has finished, while this thread waits: `f`, what it borrows and what it returns
        // are used by one thread at a time, as if moved there and back. Nothing here keeps them
        // on the worker afterwards.
        struct Pass<T>(T);
        unsafe impl<T> Send for Pass<T> {}
        impl<T> Pass<T> {
            fn take(self) -> T {
                self.0
            }
        }
        let f = Pass(f);
        rayon::scope(move |_| Pass(f.take()())).take()
    }

    fn add(&self, dst: V, a: V, b: V) {
        let _p = self.op("add");
        disjoint(&dst, &[&a, &b]);
        unsafe { kernels::add(self.wr(dst), self.rd(a), self.rd(b)) }
    }
    fn add_assign(&self, dst: V, src: V) {
        let _p = self.op("add_assign");
        disjoint(&dst, &[&src]);
        unsafe { kernels::axpby(self.wr(dst), 1.0, 1.0, self.rd(src)) }
    }
    fn axpby(&self, dst: V, alpha: f32, beta: f32, src: V) {
        let _p = self.op("axpby");
        disjoint(&dst, &[&src]);
        unsafe { kernels::axpby(self.wr(dst), alpha, beta, self.rd(src)) }
    }
    fn sumsq(&self, dst: V, x: V) {
        let _p = self.op("sumsq");
        disjoint(&dst, &[&x]);
        unsafe { self.wr(dst)[0] = kernels::sumsq(self.rd(x)) as f32 }
    }
    fn scale_by_rnorm(&self, x: V, ss: V, eps: f32) {
        let _p = self.op("scale_by_rnorm");
        disjoint(&x, &[&ss]);
        let s = 1.0 / (unsafe { self.rd(ss)[0] }.sqrt() + eps);
        unsafe { kernels::scale(self.wr(x), s) }
    }

    fn gemm(&self, c: V, a: V, ta: Trans, b: V, tb: Trans, m: usize, n: usize, k: usize, alpha: f32, beta: f32) {
        self.gemm_products(c, a, ta, b, tb, m, n, k, alpha, beta)
    }
    fn matmul_forward(&self, out: V, inp: V, w: V, b: Option<V>, n: usize, c: usize, oc: usize) {
        self.forward_product(out, inp, w, b, n, c, oc)
    }
    fn matmul_forward_gelu(&self, out: V, pre: V, inp: V, w: V, b: Option<V>, n: usize, c: usize, oc: usize) {
        self.forward_product_gelu(out, pre, inp, w, b, n, c, oc)
    }
    fn matmul_forward_segments(&self, segments: &[Segment<'_, CpuBuf>], c: usize, oc: usize) {
        self.forward_segments(segments, c, oc)
    }
    fn matmul_backward_segments(&self, segments: &[Segment<'_, CpuBuf>], dinp: &[V], dw: &[V], c: usize, oc: usize) {
        self.backward_segments(segments, dinp, dw, c, oc)
    }
    fn matmul_forward_segments_gathered(&self, segments: &[Segment<'_, CpuBuf>], xs: V, x: V, rows: &CpuIds, c: usize, oc: usize) {
        self.forward_segments_gathered(segments, xs, x, rows, c, oc)
    }
    fn moe_combine_backward_segments(
        &self,
        segments: &[Segment<'_, CpuBuf>],
        dinp: &[V],
        dw: &[V],
        comb: MoeCombine<'_, Self>,
        f: usize,
        c: usize,
    ) {
        self.combine_backward_segments(segments, dinp, dw, comb, f, c)
    }

    fn matmul_backward(&self, dinp: Option<V>, dw: V, db: Option<V>, dout: V, inp: V, w: V, n: usize, c: usize, oc: usize) {
        self.backward_product(dinp, dw, db, dout, inp, w, n, c, oc)
    }
    fn matmul_backward_add(&self, dinp: V, scratch: V, dw: V, db: Option<V>, dout: V, inp: V, w: V, n: usize, c: usize, oc: usize) {
        self.backward_product_add(dinp, scratch, dw, db, dout, inp, w, n, c, oc)
    }
    fn matmul_backward_gelu(&self, dpre: V, _dact: V, dw: V, db: Option<V>, dout: V, act: V, w: V, pre: V, n: usize, c: usize, oc: usize) {
        self.backward_product_gelu(dpre, dw, db, dout, act, w, pre, n, c, oc)
    }

    fn encoder_forward(&self, out: V, ids: &CpuIds, wte: V, wpe: Option<V>, b: usize, t: usize, c: usize) {
        let _p = self.op("encoder_forward");
        disjoint(&out, &[&wte]);
        if let Some(wpe) = &wpe {
            disjoint(&out, &[wpe]);
        }
        unsafe { kernels::encoder_forward(self.wr(out), ids.slice(), self.rd(wte), wpe.map(|v| self.rd(v)), b, t, c) }
    }
    fn encoder_backward(&self, dwte: V, dwpe: Option<V>, dout: V, ids: &CpuIds, b: usize, t: usize, c: usize) {
        let _p = self.op("encoder_backward");
        disjoint(&dwte, &[&dout]);
        if let Some(dwpe) = &dwpe {
            disjoint(&dwte, &[dwpe]);
            disjoint(dwpe, &[&dout]);
        }
        unsafe { kernels::encoder_backward(self.wr(dwte), dwpe.map(|v| self.wr(v)), self.rd(dout), ids.slice(), b, t, c) }
    }

    fn layernorm_forward(&self, out: V, mean: V, rstd: V, inp: V, w: V, b: V, n: usize, c: usize) {
        let _p = self.op("layernorm_forward");
        for o in [&out, &mean, &rstd] {
            disjoint(o, &[&inp, &w, &b]);
        }
        disjoint(&out, &[&mean, &rstd]);
        disjoint(&mean, &[&rstd]);
        unsafe { kernels::layernorm_forward(self.wr(out), self.wr(mean), self.wr(rstd), self.rd(inp), self.rd(w), self.rd(b), n, c) }
    }
    fn layernorm_backward(&self, dinp: V, dw: V, db: V, dout: V, inp: V, w: V, mean: V, rstd: V, n: usize, c: usize) {
        let _p = self.op("layernorm_backward");
        for o in [&dinp, &dw, &db] {
            disjoint(o, &[&dout, &inp, &w, &mean, &rstd]);
        }
        disjoint(&dinp, &[&dw, &db]);
        disjoint(&dw, &[&db]);
        unsafe {
            kernels::layernorm_backward(
                self.wr(dinp),
                self.wr(dw),
                self.wr(db),
                self.rd(dout),
                self.rd(inp),
                self.rd(w),
                self.rd(mean),
                self.rd(rstd),
                n,
                c,
            )
        }
    }

    fn attention_forward(&self, out: V, att: V, qkv: V, b: usize, t: usize, c: usize, nh: usize) {
        let _p = self.op("attention_forward");
        disjoint(&out, &[&att, &qkv]);
        disjoint(&att, &[&qkv]);
        assert!(
            att.len == self.attention_state_len(b, t, nh),
            "attention_forward: att holds {} floats, not {}",
            att.len,
            self.attention_state_len(b, t, nh)
        );
        let qkv = unsafe { self.operand(self.rd(qkv)) };
        match self.attention() {
            Attention::Materialized => unsafe { attention::attention_forward(self.wr(out), self.wr(att), &qkv, b, t, c, nh) },
            Attention::Flash => unsafe { flash::flash_forward(self.wr(out), self.wr(att), &qkv, b, t, c, nh, self.precision()) },
        }
    }
    fn attention_backward(&self, dqkv: V, datt: V, dout: V, qkv: V, out: V, att: V, b: usize, t: usize, c: usize, nh: usize) {
        let _p = self.op("attention_backward");
        disjoint(&dqkv, &[&datt, &dout, &qkv, &out, &att]);
        disjoint(&datt, &[&dout, &qkv, &out, &att]);
        assert!(
            att.len == self.attention_state_len(b, t, nh) && datt.len >= self.attention_scratch_len(b, t, nh),
            "attention_backward: att/datt sizes"
        );
        match self.attention() {
            Attention::Materialized => {
                // In bf16/tf32 q, k, v and dout are read rounded; the probabilities enter the
                // softmax backward (and, unlike on a GPU, the dV product) unrounded.
                let (dout, qkv) = unsafe { (self.operand(self.rd(dout)), self.operand(self.rd(qkv))) };
                unsafe { attention::attention_backward(self.wr(dqkv), &dout, &qkv, self.rd(att), b, t, c, nh) }
            }
            Attention::Flash => {
                // D = rowsum(dout · out) from the fp32 values, into the scratch.
                unsafe { flash::flash_rowdot(self.wr(datt), self.rd(dout), self.rd(out), b, t, c, nh) };
                let (g, x) = unsafe { (self.operand(self.rd(dout)), self.operand(self.rd(qkv))) };
                unsafe { flash::flash_backward(self.wr(dqkv), &g, &x, self.rd(att), self.rd(datt), b, t, c, nh, self.precision()) }
            }
        }
    }

    fn residual_layernorm_forward(&self, res: V, out: V, mean: V, rstd: V, x: V, y: V, alpha: f32, w: V, b: V, n: usize, c: usize) {
        self.residual_layernorm(res, out, mean, rstd, x, y, alpha, w, b, n, c)
    }
    fn residual_rmsnorm_forward(&self, res: V, out: V, rstd: V, x: V, y: V, alpha: f32, w: V, n: usize, c: usize, eps: f32) {
        self.residual_rmsnorm(res, out, rstd, x, y, alpha, w, n, c, eps)
    }
    fn rmsnorm_forward(&self, out: V, rstd: V, inp: V, w: V, n: usize, c: usize, eps: f32) {
        let _p = self.op("rmsnorm_forward");
        for o in [&out, &rstd] {
            disjoint(o, &[&inp, &w]);
        }
        disjoint(&out, &[&rstd]);
        unsafe { llama::rmsnorm_forward(self.wr(out), self.wr(rstd), self.rd(inp), self.rd(w), n, c, eps) }
    }
    fn rmsnorm_backward(&self, dinp: V, dw: V, dout: V, inp: V, w: V, rstd: V, n: usize, c: usize) {
        let _p = self.op("rmsnorm_backward");
        for o in [&dinp, &dw] {
            disjoint(o, &[&dout, &inp, &w, &rstd]);
        }
        disjoint(&dinp, &[&dw]);
        unsafe { llama::rmsnorm_backward(self.wr(dinp), self.wr(dw), self.rd(dout), self.rd(inp), self.rd(w), self.rd(rstd), n, c) }
    }
    fn head_rmsnorm_forward(&self, out: V, rstd: V, inp: V, w: V, rows: usize, stride: usize, heads: usize, hd: usize, eps: f32) {
        let _p = self.op("head_rmsnorm_forward");
        for o in [&out, &rstd] {
            disjoint(o, &[&inp, &w]);
        }
        disjoint(&out, &[&rstd]);
        unsafe { llama::head_rmsnorm_forward(self.wr(out), self.wr(rstd), self.rd(inp), self.rd(w), rows, stride, heads, hd, eps) }
    }
    fn head_rmsnorm_backward(&self, d: V, dw: V, inp: V, w: V, rstd: V, rows: usize, stride: usize, heads: usize, hd: usize) {
        let _p = self.op("head_rmsnorm_backward");
        for o in [&d, &dw] {
            disjoint(o, &[&inp, &w, &rstd]);
        }
        disjoint(&d, &[&dw]);
        unsafe { llama::head_rmsnorm_backward(self.wr(d), self.wr(dw), self.rd(inp), self.rd(w), self.rd(rstd), rows, stride, heads, hd) }
    }
    fn gather_rows(&self, out: V, inp: V, rows: &CpuIds, m: usize, c: usize) {
        let _p = self.op("gather_rows");
        disjoint(&out, &[&inp]);
        unsafe { llama::gather_rows(self.wr(out), self.rd(inp), rows.slice(), m, c) }
    }
    fn moe_combine(&self, out: V, ys: V, slots: &CpuIds, weights: Option<V>, n: usize, k: usize, c: usize) {
        let _p = self.op("moe_combine");
        disjoint(&out, &[&ys]);
        if let Some(w) = &weights {
            disjoint(&out, &[w]);
        }
        unsafe { llama::moe_combine(self.wr(out), self.rd(ys), slots.slice(), weights.map(|w| self.rd(w)), n, k, c) }
    }
    fn moe_combine_backward(&self, dys: V, dweights: V, dout: V, ys: V, slots: &CpuIds, weights: V, n: usize, k: usize, c: usize) {
        let _p = self.op("moe_combine_backward");
        for o in [&dys, &dweights] {
            disjoint(o, &[&dout, &ys, &weights]);
        }
        disjoint(&dys, &[&dweights]);
        let (dys, dweights, dout, ys, weights) = unsafe { (self.wr(dys), self.wr(dweights), self.rd(dout), self.rd(ys), self.rd(weights)) };
        llama::moe_combine_backward(dys, dweights, dout, ys, slots.slice(), weights, n, k, c)
    }
    fn rope(&self, x: V, rows: usize, t: usize, stride: usize, heads: usize, hd: usize, theta: f32, inverse: bool) {
        let _p = self.op("rope");
        unsafe { llama::rope(self.wr(x), rows, t, stride, heads, hd, theta, if inverse { -1.0 } else { 1.0 }) }
    }
    fn gqa_expand(&self, out: V, inp: V, n: usize, nh: usize, kv: usize, hd: usize) {
        let _p = self.op("gqa_expand");
        disjoint(&out, &[&inp]);
        unsafe { llama::gqa_expand(self.wr(out), self.rd(inp), n, nh, kv, hd) }
    }
    fn gqa_reduce(&self, dinp: V, dout: V, n: usize, nh: usize, kv: usize, hd: usize) {
        let _p = self.op("gqa_reduce");
        disjoint(&dinp, &[&dout]);
        unsafe { llama::gqa_reduce(self.wr(dinp), self.rd(dout), n, nh, kv, hd) }
    }
    fn swiglu_forward(&self, out: V, inp: V, n: usize, f: usize) {
        let _p = self.op("swiglu_forward");
        disjoint(&out, &[&inp]);
        unsafe { llama::swiglu_forward(self.wr(out), self.rd(inp), n, f) }
    }
    fn swiglu_backward(&self, dinp: V, inp: V, dout: V, n: usize, f: usize) {
        let _p = self.op("swiglu_backward");
        disjoint(&dinp, &[&inp, &dout]);
        unsafe { llama::swiglu_backward(self.wr(dinp), self.rd(inp), self.rd(dout), n, f) }
    }
    fn gelu_forward(&self, out: V, inp: V) {
        let _p = self.op("gelu_forward");
        disjoint(&out, &[&inp]);
        unsafe { kernels::gelu_forward(self.wr(out), self.rd(inp)) }
    }
    fn gelu_backward(&self, dinp: V, inp: V, dout: V) {
        let _p = self.op("gelu_backward");
        disjoint(&dinp, &[&inp, &dout]);
        unsafe { kernels::gelu_backward(self.wr(dinp), self.rd(inp), self.rd(dout)) }
    }

    fn crossentropy_forward_backward(&self, logits: V, losses: V, targets: &CpuIds, dscale: f32, n: usize, v: usize, vp: usize) {
        let _p = self.op("crossentropy_forward_backward");
        disjoint(&losses, &[&logits]);
        unsafe { kernels::crossentropy(self.wr(logits), self.wr(losses), targets.slice(), dscale, n, v, vp) }
    }

    fn adamw_update(&self, p: V, g: V, m: V, v: V, lr: f32, beta1: f32, beta2: f32, eps: f32, wd: f32, t: u64) {
        let _p = self.op("adamw_update");
        for o in [&p, &m, &v] {
            disjoint(o, &[&g]);
        }
        disjoint(&p, &[&m, &v]);
        disjoint(&m, &[&v]);
        unsafe { kernels::adamw(self.wr(p), self.rd(g), self.wr(m), self.wr(v), lr, beta1, beta2, eps, wd, t) }
    }
    fn momentum_update(&self, u: V, m: V, g: V, mu: f32, nesterov: bool) {
        let _p = self.op("momentum_update");
        disjoint(&u, &[&m, &g]);
        disjoint(&m, &[&g]);
        unsafe { kernels::momentum(self.wr(u), self.wr(m), self.rd(g), mu, nesterov) }
    }
    fn apply_update(&self, p: V, u: V, lr: f32, scale: f32, wd: f32) {
        let _p = self.op("apply_update");
        disjoint(&p, &[&u]);
        unsafe { kernels::apply_update(self.wr(p), self.rd(u), lr * scale, 1.0 - lr * wd) }
    }
    fn nsgd_apply(&self, p: V, u: V, ss: V, lr: f32, wd: f32, eps: f32) {
        let _p = self.op("nsgd_apply");
        disjoint(&p, &[&u, &ss]);
        let rnorm = 1.0 / (unsafe { self.rd(ss)[0] }.sqrt() + eps);
        unsafe { kernels::apply_update(self.wr(p), self.rd(u), lr * rnorm, 1.0 - lr * wd) }
    }
}
