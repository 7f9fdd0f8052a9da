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

    /// Row-major `C = alpha · op(A) · op(B) + beta · C` for `batch` matrices at the given element
    /// strides (C (m, n), op(A) (m, k), op(B) (k, n)); device pointers are raw addresses.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_rm(
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
        stride_c: i64,
        stride_a: i64,
        stride_b: i64,
    ) {
        let (op_a, lda) = match ta {
            Trans::N => (sys::cublasOperation_t::CUBLAS_OP_N, k),
            Trans::T => (sys::cublasOperation_t::CUBLAS_OP_T, m),
        };
        let (op_b, ldb) = match tb {
            Trans::N => (sys::cublasOperation_t::CUBLAS_OP_N, n),
            Trans::T => (sys::cublasOperation_t::CUBLAS_OP_T, k),
        };
        let (m_, n_, k_) = (n as i32, m as i32, k as i32);
        let r = unsafe {
            if batch <= 1 {
                result::sgemm(
                    self.handle,
                    op_b,
                    op_a,
                    m_,
                    n_,
                    k_,
                    &alpha,
                    b as *const f32,
                    ldb as i32,
                    a as *const f32,
                    lda as i32,
                    &beta,
                    c as *mut f32,
                    n as i32,
                )
            } else {
                result::sgemm_strided_batched(
                    self.handle,
                    op_b,
                    op_a,
                    m_,
                    n_,
                    k_,
                    &alpha,
                    b as *const f32,
                    ldb as i32,
                    stride_b,
                    a as *const f32,
                    lda as i32,
                    stride_a,
                    &beta,
                    c as *mut f32,
                    n as i32,
                    stride_c,
                    batch as i32,
                )
            }
        };
        if let Err(e) = r {
            panic!("cuBLAS sgemm ({m}x{n}x{k}, batch {batch}) failed: {e:?}");
        }
    }
}

impl Blas {
    /// [`Blas::gemm_rm`] with bf16 operands `a` and `b` (raw addresses of bf16 data) and an fp32
    /// `c`, accumulating in fp32 on the tensor cores (`cublasGemmEx` with `CUBLAS_COMPUTE_32F`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_rm_bf16(
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
        stride_c: i64,
        stride_a: i64,
        stride_b: i64,
    ) {
        let (op_a, lda) = match ta {
            Trans::N => (sys::cublasOperation_t::CUBLAS_OP_N, k),
            Trans::T => (sys::cublasOperation_t::CUBLAS_OP_T, m),
        };
        let (op_b, ldb) = match tb {
            Trans::N => (sys::cublasOperation_t::CUBLAS_OP_N, n),
            Trans::T => (sys::cublasOperation_t::CUBLAS_OP_T, k),
        };
        let (m_, n_, k_) = (n as i32, m as i32, k as i32);
        let bf16 = sys::cudaDataType::CUDA_R_16BF;
        let f32t = sys::cudaDataType::CUDA_R_32F;
        let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP;
        let (alpha_p, beta_p) = (&alpha as *const f32 as *const std::ffi::c_void, &beta as *const f32 as *const std::ffi::c_void);
        let r = unsafe {
            if batch <= 1 {
                result::gemm_ex(
                    self.handle,
                    op_b,
                    op_a,
                    m_,
                    n_,
                    k_,
                    alpha_p,
                    b as *const std::ffi::c_void,
                    bf16,
                    ldb as i32,
                    a as *const std::ffi::c_void,
                    bf16,
                    lda as i32,
                    beta_p,
                    c as *mut std::ffi::c_void,
                    f32t,
                    n as i32,
                    compute,
                    algo,
                )
            } else {
                result::gemm_strided_batched_ex(
                    self.handle,
                    op_b,
                    op_a,
                    m_,
                    n_,
                    k_,
                    alpha_p,
                    b as *const std::ffi::c_void,
                    bf16,
                    ldb as i32,
                    stride_b,
                    a as *const std::ffi::c_void,
                    bf16,
                    lda as i32,
                    stride_a,
                    beta_p,
                    c as *mut std::ffi::c_void,
                    f32t,
                    n as i32,
                    stride_c,
                    batch as i32,
                    compute,
                    algo,
                )
            }
        };
        if let Err(e) = r {
            panic!("cuBLAS bf16 gemm ({m}x{n}x{k}, batch {batch}) failed: {e:?}");
        }
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}
