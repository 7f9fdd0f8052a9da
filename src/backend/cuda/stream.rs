//! The CUDA backend's own helpers on a stream: bf16 operand copies, the one cuBLAS product
//! every linear op goes through (and cuBLASLt's product with a bias), kernel lookup and launch
//! shapes, and the attention scratch.

use super::super::{Backend, Precision, Trans};
use super::{blas, p, V};
use cudarc::driver::{CudaFunction, DevicePtr, LaunchConfig, PushKernelArg};

impl super::CudaBackend {
    /// A product operand as the stream's precision reads it: `src` itself in fp32 and TF32
    /// (cuBLAS rounds TF32 on the fly), else a bf16 copy of its `len` floats in scratch `slot`.
    pub(super) fn operand(&self, slot: usize, src: u64, len: usize) -> u64 {
        if Backend::precision(self) != Precision::Bf16 {
            return src;
        }
        let dst = self.bf16_slot(slot, len);
        let n = len as i64;
        let blocks = len.div_ceil(256).clamp(1, 65536) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "f32_to_bf16_kernel", cfg, &dst, &src, &n);
        dst
    }

    /// The address of bf16 scratch `slot`, grown to at least `len` elements.
    pub(super) fn bf16_slot(&self, slot: usize, len: usize) -> u64 {
        let mut s = self.bf16.lock().expect("bf16 scratch lock");
        let have = s.slots[slot].as_ref().map_or(0, |b| b.len());
        if have < len {
            // The old copy is freed in stream order (after the work that reads it).
            let mem =
                self.stream.alloc_zeros::<u16>(len).unwrap_or_else(|e| panic!("cuda alloc of {len} bf16 on {}: {e:?}", self.device_name));
            s.slots[slot] = Some(mem);
        }
        let (dst, _) = s.slots[slot].as_ref().expect("allocated").device_ptr(&self.stream);
        dst
    }

    /// `parts` (B, T, parts, NH, hs) fp32 rows as head-major bf16 (parts, B, NH, T, hs) in scratch
    /// `slot`: the layout the flash kernels read in 16-byte tiles.
    pub(super) fn heads_bf16(&self, slot: usize, src: u64, b: usize, t: usize, parts: usize, nh: usize, hs: usize) -> u64 {
        let len = parts * b * t * nh * hs;
        let dst = self.bf16_slot(slot, len);
        let (bi, ti, pi, nhi, hsi) = (b as i32, t as i32, parts as i32, nh as i32, hs as i32);
        let blocks = (len / 2).div_ceil(256).clamp(1, 65536) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "heads_to_bf16_kernel", cfg, &dst, &src, &bi, &ti, &pi, &nhi, &hsi);
        dst
    }

    /// `c = alpha op(a) op(b) + beta c` on operands made by [`CudaBackend::operand`].
    pub(super) fn product(
        &self,
        c: u64,
        a: u64,
        ta: Trans,
        b: u64,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        beta: f32,
        batch: usize,
        strides: (i64, i64, i64),
    ) {
        let prod = blas::Product { c, a, ta, b, tb, m, n, k, alpha, beta, batch, strides };
        if Backend::precision(self) == Precision::Bf16 {
            self.blas.gemm_rm_bf16(&prod);
        } else {
            self.blas.gemm_rm(&prod);
        }
    }

    /// `c (m, n) = a (m, k) · b (n, k)ᵀ + bias (n)` on operands made by
    /// [`CudaBackend::operand`], in one cuBLASLt call (with `gelu_pre`: that sum goes there and
    /// `c` gets its GELU); false (nothing done) where cuBLASLt cannot, or `TAPROOT_CUBLASLT=0`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn product_bias(&self, c: u64, a: u64, b: u64, bias: u64, gelu_pre: Option<u64>, m: usize, n: usize, k: usize) -> bool {
        let prod = blas::Product { c, a, ta: Trans::N, b, tb: Trans::T, m, n, k, alpha: 1.0, beta: 0.0, batch: 1, strides: (0, 0, 0) };
        let pr = Backend::precision(self);
        self.lt.lock().expect("cuBLASLt lock").gemm_bias(&prod, bias, gelu_pre, pr == Precision::Bf16, pr == Precision::Tf32)
    }

    /// The linear forward, `Backend::matmul_forward` and `matmul_forward_gelu`: pre = inp · wᵀ
    /// (+ b), and with `gelu` out = GELU(pre). With a bias, one cuBLASLt call where it can
    /// (`lt.rs`: the bias, and GELU, in its epilogue); else the cuBLAS product, the bias kernel
    /// and the GELU kernel, on the operands already made.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_forward(&self, pre: V, gelu: Option<V>, inp: V, w: V, b: Option<V>, n: usize, c: usize, oc: usize) {
        self.bind(); // cuBLAS works in the current context
        assert!(pre.len == n * oc && gelu.is_none_or(|o| o.len == n * oc) && inp.len == n * c && w.len == oc * c, "matmul_forward: shapes");
        let (x, ww) = (self.operand(0, p(&inp), n * c), self.operand(1, p(&w), oc * c));
        if let Some(b) = b {
            // cuBLASLt writes GELU's output to D and the pre-activation to its aux buffer.
            let (d, aux) = gelu.map_or((p(&pre), None), |o| (p(&o), Some(p(&pre))));
            if self.product_bias(d, x, ww, p(&b), aux, n, oc, c) {
                return;
            }
        }
        self.product(p(&pre), x, Trans::N, ww, Trans::T, n, oc, c, 1.0, 0.0, 1, (0, 0, 0));
        if let Some(b) = b {
            let (o, bb, ni, oci) = (p(&pre), p(&b), n as i32, oc as i32);
            launch!(self, "add_bias_kernel", Self::cfg1d(n * oc), &o, &bb, &ni, &oci);
        }
        if let Some(out) = gelu {
            Backend::gelu_forward(self, out, pre);
        }
    }

    pub(super) fn f(&self, name: &str) -> &CudaFunction {
        self.dev.funcs.get(name).unwrap_or_else(|| panic!("kernel {name} missing from KERNEL_NAMES"))
    }

    pub(super) fn check(&self, what: &str, r: std::result::Result<(), cudarc::driver::DriverError>) {
        if let Err(e) = r {
            panic!("CUDA error in {what} on {}: {e:?}", self.device_name);
        }
    }

    /// Make this device's context current on the calling thread. Actors move between threads
    /// and a thread may last have worked for another device; cudarc binds before its own calls,
    /// the raw driver calls below (copies) bind here.
    pub(super) fn bind(&self) {
        self.check("binding the context", self.dev.ctx.bind_to_thread());
    }

    pub(super) fn cfg1d(n: usize) -> LaunchConfig {
        let threads = 256u32;
        LaunchConfig { grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }

    /// One warp per row, 8 warps per block.
    pub(super) fn cfg_rows(rows: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: ((rows as u32).div_ceil(8).max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    pub(super) fn attn_scratch(&self, n: usize) -> u64 {
        let mut s = self.scratch.lock().expect("scratch lock");
        if s.len < n {
            let mem = self.stream.alloc_zeros::<f32>(n).unwrap_or_else(|e| panic!("cuda alloc of {n} floats: {e:?}"));
            s.buf = Some(mem);
            s.len = n;
        }
        let (p, _) = s.buf.as_ref().expect("allocated").device_ptr(&self.stream);
        p
    }
}
