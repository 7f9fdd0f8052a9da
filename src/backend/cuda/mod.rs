//! The CUDA backend: cudarc with dynamic loading (it compiles, and the crate runs, on machines
//! without CUDA), cuBLAS for every matrix product, NVRTC-compiled kernels (`kernels.cu`) for
//! everything else, one `CudaStream` per backend value — that is, per actor of the pipeline.
//!
//! Rooms: this file is the `impl Backend for CudaBackend`, a method per op of the trait, so that
//! it reads side by side with the CPU backend and the trait; the devices (kernel compile,
//! contexts, peer access) are in `device.rs`, the buffers and per-stream scratch in
//! `buffers.rs`, the stream's own helpers (bf16 operands, the product, launch shapes) in
//! `stream.rs`, the cuBLAS calls in `blas.rs`, the kernels in `kernels.cu` and `flash.cu`.
//!
//! - **Probing.** [`CudaBackend::open`] checks that libcuda can be loaded before creating a
//!   context (creating one without it panics inside the driver bindings); a missing library or
//!   device is an error that names `LD_LIBRARY_PATH`, never a panic.
//! - **Memory.** A [`CudaBuf`] owns device memory; ops address it through raw device pointers
//!   plus the view's offset, like the CPU backend's raw pointers. cudarc's automatic per-buffer
//!   event tracking is switched off: ordering across streams is this crate's job, with explicit
//!   events (`record` / `wait`), so a hand-off between the pipeline's actors never synchronises the host.
//! - **Synchronisation.** Within a step the host waits only in `download` (the loss, metrics).
//!   Token ids go up through a ring of pinned staging buffers, so their copies are asynchronous.
//! - **Numerics.** Storage is fp32. The products compute in the stream's precision
//!   ([`Backend::set_precision`], the `[precision] compute` key): fp32 by default, so parity tests
//!   against the CPU reference hold at 1e-5 relative; `tf32` switches cuBLAS to TF32 tensor-core
//!   math; `bf16` converts each operand into a bf16 scratch copy (`f32_to_bf16_kernel`, round to
//!   nearest even) and multiplies with `cublasGemmEx` (bf16 inputs, fp32 accumulation and
//!   output), matching the CPU backend's emulation of the same scheme. Flash attention
//!   (`flash.cu`, bf16 `mma.sync` tensor-core kernels) is chosen per stream
//!   ([`Backend::set_attention`]) and needs bf16. Float atomics in a few
//!   reductions make results not bitwise reproducible.
//! - **Several GPUs.** Each `cuda:N` is its own context; peer access is enabled between devices
//!   that allow it. A buffer handed to an actor on another device is brought over with a peer
//!   copy ([`Backend::copy_peer`], `cuMemcpyPeerAsync` on the receiver's stream, after waiting on
//!   the sender's event); the runtime then sends the original home (see `backend::pool::ActPool`).

mod blas;
mod buffers;
mod device;
mod lt;

use buffers::{AttnScratch, Bf16Scratch, Staging, StagingSlot, STAGING_SLOTS};
pub use buffers::{CudaBuf, CudaIds};

pub use device::{compile_kernels, device_count, driver_present, memory_used, nvrtc_present, KERNELS_CU, KERNEL_NAMES};
use device::{flash_bwd_smem, open_device, Device};
pub use lt::{enabled as cublaslt_enabled, products as cublaslt_products, set_enabled as set_cublaslt};

use super::{Attention, Backend, Precision, StreamMode, Trans, View};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaEvent, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::{Arc, Mutex};

macro_rules! launch {
    ($self:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = $self.f($name);
        let mut b = $self.stream.launch_builder(f);
        $( b.arg($arg); )*
        let r = unsafe { b.launch($cfg) }.map(|_| ());
        $self.check($name, r);
    }};
}

// Declared after `launch!`, which it uses.
mod stream;

/// A stream on a CUDA device: the `Backend` of one actor of the pipeline.
pub struct CudaBackend {
    device_name: String,
    ordinal: usize,
    dev: Arc<Device>,
    stream: Arc<CudaStream>,
    blas: blas::Blas,
    lt: Mutex<lt::Lt>,
    scratch: Mutex<AttnScratch>,
    bf16: Mutex<Bf16Scratch>,
    staging: Mutex<Staging>,
    mode: StreamMode,
}

// SAFETY: the cuBLAS handle and the stream are used from one thread at a time (the owning actor);
// cudarc's types are Send; the handle is bound to this stream only.
unsafe impl Send for CudaBackend {}

use cudarc::driver::DevicePtr;

type V<'a> = View<'a, CudaBuf>;

fn p(v: &V) -> u64 {
    assert!(v.off + v.len <= v.buf.len, "view [{}, {}) outside a buffer of {}", v.off, v.off + v.len, v.buf.len);
    v.buf.ptr + 4 * v.off as u64
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;
    type Event = CudaEvent;

    fn open(device: &str) -> Result<Self> {
        let ordinal: usize = device
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .with_context(|| format!("device {device:?} is not a CUDA device (expected \"cuda:N\")"))?;
        let dev = open_device(ordinal)?;
        let stream = dev.ctx.new_stream().map_err(|e| anyhow!("creating a stream on {device}: {e:?}"))?;
        let blas = blas::Blas::new(&stream)?;
        let lt = Mutex::new(lt::Lt::new(&stream));
        Ok(CudaBackend {
            device_name: device.to_string(),
            ordinal,
            dev,
            stream,
            blas,
            lt,
            scratch: Mutex::new(AttnScratch::default()),
            bf16: Mutex::new(Bf16Scratch::default()),
            staging: Mutex::new(Staging::default()),
            mode: StreamMode::default(),
        })
    }
    fn device(&self) -> &str {
        &self.device_name
    }
    fn fork(&self) -> Result<Self> {
        Self::open(&self.device_name)
    }
    fn set_precision(&self, p: Precision) -> Result<()> {
        self.blas.set_tf32(p == Precision::Tf32)?;
        self.mode.set_precision(p);
        Ok(())
    }
    fn precision(&self) -> Precision {
        self.mode.precision()
    }
    fn set_attention(&self, a: Attention) -> Result<()> {
        if a == Attention::Flash && Backend::precision(self) != Precision::Bf16 {
            bail!(
                "flash attention on {} runs on bf16 tensor cores: it needs `precision.compute = \"bf16\"` (this stream computes in {})",
                self.device_name,
                Backend::precision(self)
            );
        }
        self.mode.set_attention(a);
        Ok(())
    }
    fn attention(&self) -> Attention {
        self.mode.attention()
    }

    fn alloc(&self, n: usize) -> CudaBuf {
        let mem =
            self.stream.alloc_zeros::<f32>(n.max(1)).unwrap_or_else(|e| panic!("cuda alloc of {n} floats on {}: {e:?}", self.device_name));
        let (ptr, _) = mem.device_ptr(&self.stream);
        CudaBuf { ptr, len: n, ordinal: self.ordinal, ctx: self.dev.ctx.clone(), _mem: mem }
    }
    fn alloc_ids(&self, n: usize) -> CudaIds {
        let mem = self.stream.alloc_zeros::<u32>(n.max(1)).unwrap_or_else(|e| panic!("cuda alloc of {n} ids: {e:?}"));
        let (ptr, _) = mem.device_ptr(&self.stream);
        CudaIds { ptr, len: n, _mem: mem }
    }
    fn buf_len(buf: &CudaBuf) -> usize {
        buf.len
    }
    fn ids_len(ids: &CudaIds) -> usize {
        ids.len
    }
    fn upload(&self, dst: V, src: &[f32]) {
        assert_eq!(dst.len, src.len(), "upload: view of {} from host slice of {}", dst.len, src.len());
        self.bind();
        let r = unsafe { cudarc::driver::result::memcpy_htod_async(p(&dst), src, self.stream.cu_stream()) };
        self.check("upload", r);
        // The host slice may be freed as soon as we return.
        self.synchronize();
    }
    fn upload_ids(&self, dst: &CudaIds, src: &[u32]) {
        assert_eq!(dst.len, src.len(), "upload_ids: buffer of {} from host slice of {}", dst.len, src.len());
        // Through a pinned staging slot, so the copy is truly asynchronous and the host does not
        // wait for the stream (token ids are uploaded twice per micro-batch, inside the step).
        self.bind();
        let mut st = self.staging.lock().expect("staging lock");
        let i = st.next;
        st.next = (i + 1) % STAGING_SLOTS;
        if st.slots.len() <= i {
            st.slots.resize_with(i + 1, || None);
        }
        // Reusing a slot waits for the copy that last read it: STAGING_SLOTS uploads ago, long
        // done unless the host runs far ahead of the device (then this is the back-pressure).
        if let Some(slot) = &st.slots[i] {
            self.check("staging slot wait", slot.done.synchronize());
        }
        if st.slots[i].as_ref().is_none_or(|s| s.host.len() < src.len()) {
            let host = unsafe { self.dev.ctx.alloc_pinned::<u32>(src.len().max(1)) }
                .unwrap_or_else(|e| panic!("pinned alloc of {} ids on {}: {e:?}", src.len(), self.device_name));
            let done = self.dev.ctx.new_event(None).unwrap_or_else(|e| panic!("creating an event on {}: {e:?}", self.device_name));
            st.slots[i] = Some(StagingSlot { host, done });
        }
        let slot = st.slots[i].as_mut().expect("slot allocated above");
        let staged = &mut slot.host.as_mut_slice().unwrap_or_else(|e| panic!("pinned staging on {}: {e:?}", self.device_name))[..src.len()];
        staged.copy_from_slice(src);
        let r = unsafe { cudarc::driver::result::memcpy_htod_async(dst.ptr, &*staged, self.stream.cu_stream()) };
        self.check("upload_ids", r);
        let r = slot.done.record(&self.stream);
        self.check("staging slot record", r);
    }
    fn download(&self, src: V, dst: &mut [f32]) {
        assert_eq!(src.len, dst.len(), "download: view of {} into host slice of {}", src.len, dst.len());
        self.bind();
        let r = unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, p(&src), self.stream.cu_stream()) };
        self.check("download", r);
        self.synchronize();
    }
    fn copy(&self, dst: V, src: V) {
        assert_eq!(dst.len, src.len, "copy: lengths differ");
        self.bind();
        let r = unsafe { cudarc::driver::result::memcpy_dtod_async(p(&dst), p(&src), 4 * dst.len, self.stream.cu_stream()) };
        self.check("copy", r);
    }
    fn is_local(&self, buf: &CudaBuf) -> bool {
        buf.ordinal == self.ordinal
    }
    fn copy_peer(&self, dst: V, src: V) {
        assert_eq!(dst.len, src.len, "copy_peer: lengths differ");
        assert_eq!(dst.buf.ordinal, self.ordinal, "copy_peer: the destination must be on {}", self.device_name);
        if src.buf.ordinal == self.ordinal {
            return self.copy(dst, src);
        }
        // A peer copy, ordered on this (the receiver's) stream: direct over NVLink/PCIe when peer
        // access is enabled between the two devices, staged through the host by the driver if not.
        self.bind();
        let r = unsafe {
            cudarc::driver::result::memcpy_peer_async(
                dst.buf.ctx.cu_ctx(),
                p(&dst),
                src.buf.ctx.cu_ctx(),
                p(&src),
                4 * dst.len,
                self.stream.cu_stream(),
            )
        };
        self.check("peer copy", r);
    }
    fn fill(&self, dst: V, value: f32) {
        let (x, n) = (p(&dst), dst.len as i64);
        launch!(self, "fill_kernel", Self::cfg1d(dst.len), &x, &value, &n);
    }
    fn device_view(&self, v: V) -> Option<super::DeviceView> {
        // A collective launched next (NCCL) runs in the calling thread's current context.
        let r = self.stream.context().bind_to_thread();
        self.check("binding the context", r);
        Some(super::DeviceView { ptr: p(&v), len: v.len, stream: self.stream.cu_stream() as *mut std::ffi::c_void })
    }
    fn record(&self) -> CudaEvent {
        self.stream.record_event(None).unwrap_or_else(|e| panic!("recording an event on {}: {e:?}", self.device_name))
    }
    fn wait(&self, event: &CudaEvent) {
        let r = self.stream.wait(event);
        self.check("stream wait", r);
    }
    fn synchronize(&self) {
        let r = self.stream.synchronize();
        self.check("synchronize", r);
    }

    fn add(&self, dst: V, a: V, b: V) {
        let (d, x, y, n) = (p(&dst), p(&a), p(&b), dst.len as i64);
        launch!(self, "add_kernel", Self::cfg1d(dst.len), &d, &x, &y, &n);
    }
    fn add_assign(&self, dst: V, src: V) {
        self.axpby(dst, 1.0, 1.0, src);
    }
    fn axpby(&self, dst: V, alpha: f32, beta: f32, src: V) {
        let (d, s, n) = (p(&dst), p(&src), dst.len as i64);
        launch!(self, "axpby_kernel", Self::cfg1d(dst.len), &d, &alpha, &beta, &s, &n);
    }
    fn sumsq(&self, dst: V, x: V) {
        self.fill(dst, 0.0);
        let (d, s, n) = (p(&dst), p(&x), x.len as i64);
        let blocks = (x.len.div_ceil(256)).clamp(1, 1024) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "sumsq_kernel", cfg, &d, &s, &n);
    }
    fn scale_by_rnorm(&self, x: V, ss: V, eps: f32) {
        let (d, s, n) = (p(&x), p(&ss), x.len as i64);
        launch!(self, "scale_by_rnorm_kernel", Self::cfg1d(x.len), &d, &s, &eps, &n);
    }

    fn gemm(&self, c: V, a: V, ta: Trans, b: V, tb: Trans, m: usize, n: usize, k: usize, alpha: f32, beta: f32) {
        self.bind(); // cuBLAS works in the current context
        assert!(c.len >= m * n && a.len >= m * k && b.len >= k * n, "gemm: views too small for ({m},{n},{k})");
        let (a, b) = (self.operand(0, p(&a), m * k), self.operand(1, p(&b), k * n));
        self.product(p(&c), a, ta, b, tb, m, n, k, alpha, beta, 1, (0, 0, 0));
    }

    fn matmul_forward(&self, out: V, inp: V, w: V, b: Option<V>, n: usize, c: usize, oc: usize) {
        self.linear_forward(out, None, inp, w, b, n, c, oc)
    }
    fn matmul_forward_gelu(&self, out: V, pre: V, inp: V, w: V, b: Option<V>, n: usize, c: usize, oc: usize) {
        self.linear_forward(pre, Some(out), inp, w, b, n, c, oc)
    }
    fn matmul_backward(&self, dinp: Option<V>, dw: V, db: Option<V>, dout: V, inp: V, w: V, n: usize, c: usize, oc: usize) {
        self.bind(); // cuBLAS works in the current context
        let g = self.operand(0, p(&dout), n * oc);
        if let Some(d) = dinp {
            // dinp (N, C) = dout (N, OC) @ w (OC, C)
            let ww = self.operand(1, p(&w), oc * c);
            self.product(p(&d), g, Trans::N, ww, Trans::N, n, c, oc, 1.0, 0.0, 1, (0, 0, 0));
        }
        // dw (OC, C) += dout^T (OC, N) @ inp (N, C)
        let x = self.operand(2, p(&inp), n * c);
        self.product(p(&dw), g, Trans::T, x, Trans::N, oc, c, n, 1.0, 1.0, 1, (0, 0, 0));
        if let Some(db) = db {
            let (d, g, ni, oci) = (p(&db), p(&dout), n as i32, oc as i32);
            let cfg = LaunchConfig {
                grid_dim: ((oc as u32).div_ceil(32), (n as u32).div_ceil(256).max(1), 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, "bias_backward_kernel", cfg, &d, &g, &ni, &oci);
        }
    }

    fn encoder_forward(&self, out: V, ids: &CudaIds, wte: V, wpe: Option<V>, b: usize, t: usize, c: usize) {
        assert!(
            out.len >= b * t * c && wpe.is_none_or(|w| w.len >= t * c) && ids.len >= b * t && wte.len >= c,
            "encoder_forward: views too small for ({b},{t},{c})"
        );
        // No position table (rotary models): a null pointer, which the kernel skips.
        let (o, i, we, pe) = (p(&out), ids.ptr, p(&wte), wpe.map_or(0, |w| p(&w)));
        let (bi, ti, ci) = (b as i32, t as i32, c as i32);
        launch!(self, "encoder_forward_kernel", Self::cfg1d(b * t * c), &o, &i, &we, &pe, &bi, &ti, &ci);
    }
    fn encoder_backward(&self, dwte: V, dwpe: Option<V>, dout: V, ids: &CudaIds, b: usize, t: usize, c: usize) {
        assert!(
            dout.len >= b * t * c && dwpe.is_none_or(|w| w.len >= t * c) && ids.len >= b * t && dwte.len >= c,
            "encoder_backward: views too small for ({b},{t},{c})"
        );
        let (dw, dp, d, i) = (p(&dwte), dwpe.map_or(0, |w| p(&w)), p(&dout), ids.ptr);
        let (bi, ti, ci) = (b as i32, t as i32, c as i32);
        launch!(self, "encoder_backward_kernel", Self::cfg1d(b * t * c), &dw, &dp, &d, &i, &bi, &ti, &ci);
    }

    fn layernorm_forward(&self, out: V, mean: V, rstd: V, inp: V, w: V, b: V, n: usize, c: usize) {
        let (o, m, r, x, ww, bb) = (p(&out), p(&mean), p(&rstd), p(&inp), p(&w), p(&b));
        let (ni, ci) = (n as i32, c as i32);
        launch!(self, "layernorm_forward_kernel", Self::cfg_rows(n), &o, &m, &r, &x, &ww, &bb, &ni, &ci);
    }
    fn layernorm_backward(&self, dinp: V, dw: V, db: V, dout: V, inp: V, w: V, mean: V, rstd: V, n: usize, c: usize) {
        let (di, dww, dbb, d, x, ww, m, r) = (p(&dinp), p(&dw), p(&db), p(&dout), p(&inp), p(&w), p(&mean), p(&rstd));
        let (ni, ci) = (n as i32, c as i32);
        // 8 warps a block, at most 1024 blocks (rows stride over them): few enough that the
        // per-block dw/db partials cost little to add, enough to fill the device.
        let blocks = (n as u32).div_ceil(8).clamp(1, 1024);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: (8 * c) as u32 };
        launch!(self, "layernorm_backward_kernel", cfg, &di, &dww, &dbb, &d, &x, &ww, &m, &r, &ni, &ci);
    }

    fn attention_forward(&self, out: V, att: V, qkv: V, b: usize, t: usize, c: usize, nh: usize) {
        self.bind(); // cuBLAS works in the current context
        let hs = c / nh;
        assert!(
            att.len >= self.attention_state_len(b, t, nh) && qkv.len >= b * t * 3 * c && out.len >= b * t * c,
            "attention_forward: views too small"
        );
        if Backend::attention(self) == Attention::Flash {
            let name = match hs {
                64 => "flash_fwd_64_kernel",
                128 => "flash_fwd_128_kernel",
                _ => panic!("flash attention on CUDA supports head sizes 64 and 128, not {hs}"),
            };
            let n = (b * t * c) as u64;
            let q16 = self.heads_bf16(0, p(&qkv), b, t, 3, nh, hs);
            let (k16, v16) = (q16 + 2 * n, q16 + 4 * n);
            let (o, l, ti, nhi) = (p(&out), p(&att), t as i32, nh as i32);
            let cfg = LaunchConfig { grid_dim: ((t as u32).div_ceil(64), (b * nh) as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            launch!(self, name, cfg, &o, &l, &q16, &k16, &v16, &ti, &nhi);
            return;
        }
        let n = b * t * c;
        let s = self.attn_scratch(4 * n);
        let (q, k, v, y) = (s, s + 4 * n as u64, s + 8 * n as u64, s + 12 * n as u64);
        let (bi, ti, nhi, hsi) = (b as i32, t as i32, nh as i32, hs as i32);
        let src = p(&qkv);
        launch!(self, "permute_qkv_kernel", Self::cfg1d(n), &q, &k, &v, &src, &bi, &ti, &nhi, &hsi);
        let a = p(&att);
        let bh = b * nh;
        // pre (BH, T, T) = q @ k^T * scale, written into att, then the causal softmax in place
        let scale = 1.0 / (hs as f32).sqrt();
        let (tt, ths) = ((t * t) as i64, (t * hs) as i64);
        let (q16, k16) = (self.operand(0, q, n), self.operand(1, k, n));
        self.product(a, q16, Trans::N, k16, Trans::T, t, t, hs, scale, 0.0, bh, (tt, ths, ths));
        let (rows, tti) = ((bh * t) as i32, t as i32);
        launch!(self, "softmax_causal_kernel", Self::cfg_rows(bh * t), &a, &rows, &tti);
        // y (BH, T, hs) = att @ v
        let (a16, v16) = (self.operand(0, a, bh * t * t), self.operand(1, v, n));
        self.product(y, a16, Trans::N, v16, Trans::N, t, hs, t, 1.0, 0.0, bh, (ths, tt, ths));
        let o = p(&out);
        launch!(self, "unpermute_y_kernel", Self::cfg1d(n), &o, &y, &bi, &ti, &nhi, &hsi);
    }
    fn attention_backward(&self, dqkv: V, datt: V, dout: V, qkv: V, out: V, att: V, b: usize, t: usize, c: usize, nh: usize) {
        self.bind(); // cuBLAS works in the current context
        let hs = c / nh;
        assert!(
            att.len >= self.attention_state_len(b, t, nh) && datt.len >= self.attention_scratch_len(b, t, nh) && dqkv.len >= b * t * 3 * c,
            "attention_backward: views too small"
        );
        if Backend::attention(self) == Attention::Flash {
            let name = match hs {
                64 => "flash_bwd_64_kernel",
                128 => "flash_bwd_128_kernel",
                _ => panic!("flash attention on CUDA supports head sizes 64 and 128, not {hs}"),
            };
            // D = rowsum(dout * out) into the scratch; dQ accumulates atomically into a zeroed dqkv.
            let (dd, g, o) = (p(&datt), p(&dout), p(&out));
            let (bi, ti, nhi, hsi) = (b as i32, t as i32, nh as i32, hs as i32);
            launch!(self, "flash_rowdot_kernel", Self::cfg_rows(b * nh * t), &dd, &g, &o, &bi, &ti, &nhi, &hsi);
            self.fill(dqkv.sub(0, b * t * 3 * c), 0.0);
            let n = (b * t * c) as u64;
            // Converted again, not kept from the forward: the bf16 scratch is the stream's and other
            // ops reuse it in between (keeping a copy per block would cost 3·B·T·C bf16 each).
            let q16 = self.heads_bf16(0, p(&qkv), b, t, 3, nh, hs);
            let (k16, v16) = (q16 + 2 * n, q16 + 4 * n);
            let g16 = self.heads_bf16(1, g, b, t, 1, nh, hs);
            let (dx, l) = (p(&dqkv), p(&att));
            let cfg = LaunchConfig {
                grid_dim: ((t as u32).div_ceil(64), (b * nh) as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: flash_bwd_smem(hs) as u32,
            };
            launch!(self, name, cfg, &dx, &q16, &k16, &v16, &g16, &l, &dd, &ti, &nhi);
            return;
        }
        let n = b * t * c;
        let s = self.attn_scratch(7 * n);
        let off = |i: u64| s + i * 4 * n as u64;
        let (q, k, v, dy, dq, dk, dv) = (off(0), off(1), off(2), off(3), off(4), off(5), off(6));
        let (bi, ti, nhi, hsi) = (b as i32, t as i32, nh as i32, hs as i32);
        let src = p(&qkv);
        launch!(self, "permute_qkv_kernel", Self::cfg1d(n), &q, &k, &v, &src, &bi, &ti, &nhi, &hsi);
        let d_o = p(&dout);
        launch!(self, "permute_y_kernel", Self::cfg1d(n), &dy, &d_o, &bi, &ti, &nhi, &hsi);
        let (a, da) = (p(&att), p(&datt));
        let bh = b * nh;
        let (tt, ths) = ((t * t) as i64, (t * hs) as i64);
        // datt = dy @ v^T ; dv = att^T @ dy
        let (dy16, v16) = (self.operand(0, dy, n), self.operand(1, v, n));
        self.product(da, dy16, Trans::N, v16, Trans::T, t, t, hs, 1.0, 0.0, bh, (tt, ths, ths));
        let a16 = self.operand(2, a, bh * t * t);
        self.product(dv, a16, Trans::T, dy16, Trans::N, t, hs, t, 1.0, 0.0, bh, (ths, tt, ths));
        let (rows, tti) = ((bh * t) as i32, t as i32);
        launch!(self, "softmax_backward_kernel", Self::cfg_rows(bh * t), &da, &a, &rows, &tti);
        // dq = dpre @ k * scale ; dk = dpre^T @ q * scale
        let scale = 1.0 / (hs as f32).sqrt();
        let (da16, k16) = (self.operand(2, da, bh * t * t), self.operand(1, k, n));
        self.product(dq, da16, Trans::N, k16, Trans::N, t, hs, t, scale, 0.0, bh, (ths, tt, ths));
        let q16 = self.operand(0, q, n);
        self.product(dk, da16, Trans::T, q16, Trans::N, t, hs, t, scale, 0.0, bh, (ths, tt, ths));
        let d = p(&dqkv);
        launch!(self, "unpermute_qkv_kernel", Self::cfg1d(n), &d, &dq, &dk, &dv, &bi, &ti, &nhi, &hsi);
    }

    fn rmsnorm_forward(&self, out: V, rstd: V, inp: V, w: V, n: usize, c: usize, eps: f32) {
        assert!(out.len >= n * c && inp.len >= n * c && rstd.len >= n && w.len >= c, "rmsnorm_forward: views too small");
        let (o, r, x, ww) = (p(&out), p(&rstd), p(&inp), p(&w));
        let (ni, ci) = (n as i32, c as i32);
        launch!(self, "rmsnorm_forward_kernel", Self::cfg_rows(n), &o, &r, &x, &ww, &ni, &ci, &eps);
    }
    fn rmsnorm_backward(&self, dinp: V, dw: V, dout: V, inp: V, w: V, rstd: V, n: usize, c: usize) {
        assert!(
            dinp.len >= n * c && dout.len >= n * c && inp.len >= n * c && rstd.len >= n && dw.len >= c,
            "rmsnorm_backward: views too small"
        );
        let (di, dww, d, x, ww, r) = (p(&dinp), p(&dw), p(&dout), p(&inp), p(&w), p(&rstd));
        let (ni, ci) = (n as i32, c as i32);
        let blocks = (n as u32).div_ceil(8).clamp(1, 1024);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: (4 * c) as u32 };
        launch!(self, "rmsnorm_backward_kernel", cfg, &di, &dww, &d, &x, &ww, &r, &ni, &ci);
    }
    fn head_rmsnorm_forward(&self, out: V, rstd: V, inp: V, w: V, rows: usize, stride: usize, heads: usize, hd: usize, eps: f32) {
        let need = (rows - 1) * stride + heads * hd;
        assert!(
            heads * hd <= stride && out.len >= need && inp.len >= need && rstd.len >= rows * heads && w.len >= hd,
            "head_rmsnorm_forward: views too small"
        );
        let (o, r, x, ww) = (p(&out), p(&rstd), p(&inp), p(&w));
        let (ri, si, hi, hdi) = (rows as i32, stride as i32, heads as i32, hd as i32);
        launch!(self, "head_rmsnorm_forward_kernel", Self::cfg_rows(rows * heads), &o, &r, &x, &ww, &ri, &si, &hi, &hdi, &eps);
    }
    fn head_rmsnorm_backward(&self, d: V, dw: V, inp: V, w: V, rstd: V, rows: usize, stride: usize, heads: usize, hd: usize) {
        let need = (rows - 1) * stride + heads * hd;
        assert!(
            heads * hd <= stride && d.len >= need && inp.len >= need && rstd.len >= rows * heads && dw.len >= hd,
            "head_rmsnorm_backward: views too small"
        );
        let (dd, dww, x, ww, r) = (p(&d), p(&dw), p(&inp), p(&w), p(&rstd));
        let (ri, si, hi, hdi) = (rows as i32, stride as i32, heads as i32, hd as i32);
        // dw first, while d still holds dout: one block per element of w, a fixed-order tree sum.
        let cfg = LaunchConfig { grid_dim: (hd as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "head_rmsnorm_dw_kernel", cfg, &dww, &dd, &x, &r, &ri, &si, &hi, &hdi);
        launch!(self, "head_rmsnorm_backward_kernel", Self::cfg_rows(rows * heads), &dd, &x, &ww, &r, &ri, &si, &hi, &hdi);
    }
    fn gather_rows(&self, out: V, inp: V, rows: &CudaIds, m: usize, c: usize) {
        assert!(out.len >= m * c && rows.len >= m, "gather_rows: views too small");
        let (o, x, r) = (p(&out), p(&inp), rows.ptr);
        let (mi, ci) = (m as i32, c as i32);
        launch!(self, "gather_rows_kernel", Self::cfg1d(m * c), &o, &x, &r, &mi, &ci);
    }
    fn moe_combine(&self, out: V, ys: V, slots: &CudaIds, weights: Option<V>, n: usize, k: usize, c: usize) {
        assert!(out.len >= n * c && slots.len >= n * k && weights.is_none_or(|w| w.len >= n * k), "moe_combine: views too small");
        let (o, y, s, w) = (p(&out), p(&ys), slots.ptr, weights.map_or(0, |w| p(&w)));
        let (ni, ki, ci) = (n as i32, k as i32, c as i32);
        launch!(self, "moe_combine_kernel", Self::cfg1d(n * c), &o, &y, &s, &w, &ni, &ki, &ci);
    }
    fn moe_combine_backward(&self, dys: V, dweights: V, dout: V, ys: V, slots: &CudaIds, weights: V, n: usize, k: usize, c: usize) {
        assert!(
            dys.len >= n * k * c && dweights.len >= n * k && slots.len >= n * k && weights.len >= n * k,
            "moe_combine_backward: views too small"
        );
        let (dy, dw, d, y, s, w) = (p(&dys), p(&dweights), p(&dout), p(&ys), slots.ptr, p(&weights));
        let (ni, ki, ci) = (n as i32, k as i32, c as i32);
        launch!(self, "moe_combine_dys_kernel", Self::cfg1d(n * k * c), &dy, &d, &s, &w, &ni, &ki, &ci);
        // One warp per (token, choice) for the dot products.
        launch!(self, "moe_combine_dweights_kernel", Self::cfg_rows(n * k), &dw, &d, &y, &s, &ni, &ki, &ci);
    }
    fn rope(&self, x: V, rows: usize, t: usize, stride: usize, heads: usize, hd: usize, theta: f32, inverse: bool) {
        assert!(hd.is_multiple_of(2) && heads * hd <= stride && x.len >= rows * stride, "rope: views too small");
        let xx = p(&x);
        let (ri, ti, si, hi, hdi) = (rows as i32, t as i32, stride as i32, heads as i32, hd as i32);
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        launch!(self, "rope_kernel", Self::cfg1d(rows * heads * hd / 2), &xx, &ri, &ti, &si, &hi, &hdi, &theta, &sign);
    }
    fn gqa_expand(&self, out: V, inp: V, n: usize, nh: usize, kv: usize, hd: usize) {
        assert!(nh.is_multiple_of(kv) && out.len >= n * 3 * nh * hd && inp.len >= n * (nh + 2 * kv) * hd, "gqa_expand: views too small");
        let (o, x) = (p(&out), p(&inp));
        let (ni, nhi, kvi, hdi) = (n as i32, nh as i32, kv as i32, hd as i32);
        launch!(self, "gqa_expand_kernel", Self::cfg1d(n * 3 * nh * hd), &o, &x, &ni, &nhi, &kvi, &hdi);
    }
    fn gqa_reduce(&self, dinp: V, dout: V, n: usize, nh: usize, kv: usize, hd: usize) {
        assert!(nh.is_multiple_of(kv) && dout.len >= n * 3 * nh * hd && dinp.len >= n * (nh + 2 * kv) * hd, "gqa_reduce: views too small");
        let (di, d) = (p(&dinp), p(&dout));
        let (ni, nhi, kvi, hdi) = (n as i32, nh as i32, kv as i32, hd as i32);
        launch!(self, "gqa_reduce_kernel", Self::cfg1d(n * (nh + 2 * kv) * hd), &di, &d, &ni, &nhi, &kvi, &hdi);
    }
    fn swiglu_forward(&self, out: V, inp: V, n: usize, f: usize) {
        assert!(out.len >= n * f && inp.len >= 2 * n * f, "swiglu_forward: views too small");
        let (o, x, ni, fi) = (p(&out), p(&inp), n as i32, f as i32);
        launch!(self, "swiglu_forward_kernel", Self::cfg1d(n * f), &o, &x, &ni, &fi);
    }
    fn swiglu_backward(&self, dinp: V, inp: V, dout: V, n: usize, f: usize) {
        assert!(dinp.len >= 2 * n * f && inp.len >= 2 * n * f && dout.len >= n * f, "swiglu_backward: views too small");
        let (di, x, d, ni, fi) = (p(&dinp), p(&inp), p(&dout), n as i32, f as i32);
        launch!(self, "swiglu_backward_kernel", Self::cfg1d(n * f), &di, &x, &d, &ni, &fi);
    }
    fn gelu_forward(&self, out: V, inp: V) {
        let (o, x, n) = (p(&out), p(&inp), out.len as i64);
        launch!(self, "gelu_forward_kernel", Self::cfg1d(out.len), &o, &x, &n);
    }
    fn gelu_backward(&self, dinp: V, inp: V, dout: V) {
        let (di, x, d, n) = (p(&dinp), p(&inp), p(&dout), dinp.len as i64);
        launch!(self, "gelu_backward_kernel", Self::cfg1d(dinp.len), &di, &x, &d, &n);
    }
    fn crossentropy_forward_backward(&self, logits: V, losses: V, targets: &CudaIds, dscale: f32, n: usize, v: usize, vp: usize) {
        let (l, ls, tg) = (p(&logits), p(&losses), targets.ptr);
        let (ni, vi, vpi) = (n as i32, v as i32, vp as i32);
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "crossentropy_kernel", cfg, &l, &ls, &tg, &dscale, &ni, &vi, &vpi);
    }

    fn adamw_update(&self, pp: V, g: V, m: V, v: V, lr: f32, beta1: f32, beta2: f32, eps: f32, wd: f32, t: u64) {
        let bc1 = 1.0 - beta1.powi(t as i32);
        let bc2 = 1.0 - beta2.powi(t as i32);
        let (a, b, c, d, n) = (p(&pp), p(&g), p(&m), p(&v), pp.len as i64);
        launch!(self, "adamw_kernel", Self::cfg1d(pp.len), &a, &b, &c, &d, &lr, &beta1, &beta2, &eps, &wd, &bc1, &bc2, &n);
    }
    fn momentum_update(&self, u: V, m: V, g: V, mu: f32, nesterov: bool) {
        let (a, b, c, n, nv) = (p(&u), p(&m), p(&g), u.len as i64, nesterov as i32);
        launch!(self, "momentum_kernel", Self::cfg1d(u.len), &a, &b, &c, &mu, &nv, &n);
    }
    fn apply_update(&self, pp: V, u: V, lr: f32, scale: f32, wd: f32) {
        let (a, b, n, none) = (p(&pp), p(&u), pp.len as i64, 0u64);
        let (step, keep, eps) = (lr * scale, 1.0 - lr * wd, 0.0f32);
        launch!(self, "apply_update_kernel", Self::cfg1d(pp.len), &a, &b, &step, &keep, &none, &eps, &n);
    }
    fn nsgd_apply(&self, pp: V, u: V, ss: V, lr: f32, wd: f32, eps: f32) {
        let (a, b, s, n) = (p(&pp), p(&u), p(&ss), pp.len as i64);
        let keep = 1.0 - lr * wd;
        launch!(self, "apply_update_kernel", Self::cfg1d(pp.len), &a, &b, &lr, &keep, &s, &eps, &n);
    }
}
