//! cuBLAS for the CUDA backend: one handle per stream, row-major products mapped onto cuBLAS's
//! column-major convention.
//!
//! A row-major (r, c) matrix is, read column-major, its transpose. So for row-major
//! C (m, n) = op(A) · op(B) we ask cuBLAS for Cᵀ (n, m) = op(B)ᵀ · op(A)ᵀ, where a
//! non-transposed row-major operand is already its own transpose in column-major terms.

use crate::backend::Trans;
use anyhow::{anyhow, Result};
use cudarc::cublas::{result, sys};
use cudarc::driver::CudaStream;
use std::sync::Arc;

pub struct Blas {
    handle: sys::cublasHandle_t,
}

impl Blas {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let handle = result::create_handle().map_err(|e| anyhow!("cublasCreate: {e:?} (is libcublas on LD_LIBRARY_PATH?)"))?;
        unsafe {
            result::set_stream(handle, stream.cu_stream() as sys::cudaStream_t).map_err(|e| anyhow!("cublasSetStream: {e:?}"))?;
            sys::cublasSetMathMode(handle, sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                .result()
                .map_err(|e| anyhow!("cublasSetMathMode: {e:?}"))?;
        }
        Ok(Blas { handle })
    }

    pub fn set_tf32(&self, on: bool) -> Result<()> {
        let mode = if on { sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH } else { sys::cublasMath_t::CUBLAS_DEFAULT_MATH };
        unsafe { sys::cublasSetMathMode(self.handle, mode).result() }.map_err(|e| anyhow!("cublasSetMathMode: {e:?}"))
    }

    /// `p` in fp32 (or TF32, as the handle's math mode says): `cublasSgemm(StridedBatched)`.
    pub fn gemm_rm(&self, p: &Product) {
        let (op_a, lda, op_b, ldb) = p.ops();
        let (m_, n_, k_) = (p.n as i32, p.m as i32, p.k as i32);
        let (sc, sa, sb) = p.strides;
        let (a, b, c) = (p.a as *const f32, p.b as *const f32, p.c as *mut f32);
        let r = unsafe {
            if p.batch <= 1 {
                result::sgemm(self.handle, op_b, op_a, m_, n_, k_, &p.alpha, b, ldb, a, lda, &p.beta, c, m_)
            } else {
                result::sgemm_strided_batched(
                    self.handle,
                    op_b,
                    op_a,
                    m_,
                    n_,
                    k_,
                    &p.alpha,
                    b,
                    ldb,
                    sb,
                    a,
                    lda,
                    sa,
                    &p.beta,
                    c,
                    m_,
                    sc,
                    p.batch as i32,
                )
            }
        };
        if let Err(e) = r {
            panic!("cuBLAS sgemm ({}x{}x{}, batch {}) failed: {e:?}", p.m, p.n, p.k, p.batch);
        }
    }

    /// `p` with bf16 operands `a` and `b` (raw addresses of bf16 data) and an fp32 `c`,
    /// accumulating in fp32 on the tensor cores (`cublasGemmEx` with `CUBLAS_COMPUTE_32F`).
    pub fn gemm_rm_bf16(&self, p: &Product) {
        use std::ffi::c_void;
        let (op_a, lda, op_b, ldb) = p.ops();
        let (m_, n_, k_) = (p.n as i32, p.m as i32, p.k as i32);
        let (sc, sa, sb) = p.strides;
        let (a, b, c) = (p.a as *const c_void, p.b as *const c_void, p.c as *mut c_void);
        let (bf16, f32t) = (sys::cudaDataType::CUDA_R_16BF, sys::cudaDataType::CUDA_R_32F);
        let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP;
        let (alpha, beta) = (&p.alpha as *const f32 as *const c_void, &p.beta as *const f32 as *const c_void);
        let r = unsafe {
            if p.batch <= 1 {
                result::gemm_ex(self.handle, op_b, op_a, m_, n_, k_, alpha, b, bf16, ldb, a, bf16, lda, beta, c, f32t, m_, compute, algo)
            } else {
                let batch = p.batch as i32;
                result::gemm_strided_batched_ex(
                    self.handle,
                    op_b,
                    op_a,
                    m_,
                    n_,
                    k_,
                    alpha,
                    b,
                    bf16,
                    ldb,
                    sb,
                    a,
                    bf16,
                    lda,
                    sa,
                    beta,
                    c,
                    f32t,
                    m_,
                    sc,
                    batch,
                    compute,
                    algo,
                )
            }
        };
        if let Err(e) = r {
            panic!("cuBLAS bf16 gemm ({}x{}x{}, batch {}) failed: {e:?}", p.m, p.n, p.k, p.batch);
        }
    }
}

/// A row-major product `C = alpha · op(A) · op(B) + beta · C` over `batch` matrices at element
/// strides (c, a, b): C (m, n), op(A) (m, k), op(B) (k, n); operands are raw device addresses.
#[derive(Clone, Copy, Debug)]
pub struct Product {
    pub c: u64,
    pub a: u64,
    pub ta: Trans,
    pub b: u64,
    pub tb: Trans,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub strides: (i64, i64, i64),
}

impl Product {
    /// cuBLAS's operations and leading dimensions of A and B, read column-major (see the module
    /// doc: the product is computed as Cᵀ = op(B)ᵀ · op(A)ᵀ).
    fn ops(&self) -> (sys::cublasOperation_t, i32, sys::cublasOperation_t, i32) {
        let (op_a, lda) = match self.ta {
            Trans::N => (sys::cublasOperation_t::CUBLAS_OP_N, self.k),
            Trans::T => (sys::cublasOperation_t::CUBLAS_OP_T, self.m),
        };
        let (op_b, ldb) = match self.tb {
            Trans::N => (sys::cublasOperation_t::CUBLAS_OP_N, self.n),
            Trans::T => (sys::cublasOperation_t::CUBLAS_OP_T, self.k),
        };
        (op_a, lda as i32, op_b, ldb as i32)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}
