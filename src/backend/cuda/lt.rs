//! cuBLASLt for the CUDA backend's linear forward with a bias: the product and the bias in one
//! call (the `BIAS` epilogue), instead of a product and a separate pass over the output; and
//! with GELU after it (`GELU_AUX_BIAS`: the output is GELU's, the pre-activation the backward
//! needs goes to an aux buffer), instead of a product and two passes.
//!
//! One handle and one workspace ([`WORKSPACE`]) per stream; per shape (and precision), the
//! descriptors and the algorithm cuBLASLt's heuristic picks are made once and kept. A shape
//! cuBLASLt does not support is remembered too, and takes the cuBLAS product and the bias
//! kernel as before; so does every product when `TAPROOT_CUBLASLT=0` (for a side-by-side
//! measurement, or if a driver's cuBLASLt misbehaves).
//!
//! The row-major to column-major mapping is `blas.rs`'s: C (m, n) = op(A) · op(B) is computed
//! as Cᵀ (n, m) = op(B)ᵀ · op(A)ᵀ, so cuBLASLt's A is our B and its B our A, and the bias (one
//! value per row of Cᵀ, per column of C) is what `matmul_forward` adds to every row of out.

use super::blas::Product;
use crate::backend::Trans;
use anyhow::{anyhow, Result};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Workspace bytes per stream (cuBLASLt's heuristic is told it may use this much).
pub const WORKSPACE: usize = 32 << 20;

/// 0: not yet read from `TAPROOT_CUBLASLT`; 1: on; 2: off.
static STATE: AtomicU8 = AtomicU8::new(0);
/// Products made through cuBLASLt in this process.
static PRODUCTS: AtomicU64 = AtomicU64::new(0);

/// Whether products with a bias go through cuBLASLt (`TAPROOT_CUBLASLT=0`: never).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("TAPROOT_CUBLASLT").map_or(true, |v| v != "0");
            STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
        s => s == 1,
    }
}

/// Switch cuBLASLt's products on or off for the whole process (a benchmark's side-by-side
/// measurement, a test of both paths).
pub fn set_enabled(on: bool) {
    STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// How many products went through cuBLASLt in this process.
pub fn products() -> u64 {
    PRODUCTS.load(Ordering::Relaxed)
}

/// What a plan depends on: the shape, the operands' layout and the precision.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    /// 0: fp32, 1: TF32, 2: bf16 operands.
    precision: u8,
    /// The alignment (bytes, a power of two up to 256) of cuBLASLt's A, B and C (= D): an
    /// algorithm is chosen for pointers aligned at least so.
    align: [u32; 3],
    /// GELU after the bias, its input kept in an aux buffer (`GELU_AUX_BIAS`), or the bias alone.
    gelu: bool,
}

/// The largest power of two up to 256 that divides `ptr`.
fn alignment(ptr: u64) -> u32 {
    1 << (ptr | 256).trailing_zeros()
}

/// One shape's descriptors and algorithm.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = result::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
        }
    }
}

pub struct Lt {
    /// The handle and the workspace, made on the first product (a stream that never multiplies
    /// with a bias holds neither); `Err` where they could not be made (no libcublasLt, no
    /// memory): every product then takes the cuBLAS path.
    made: Option<std::result::Result<(sys::cublasLtHandle_t, CudaSlice<u8>), ()>>,
    /// Each shape's plan, or None where cuBLASLt does not support it.
    plans: HashMap<Key, Option<Plan>>,
    stream: Arc<CudaStream>,
}

// SAFETY: used by one thread at a time (the stream's owner, behind the backend's lock).
unsafe impl Send for Lt {}

fn lt_err(what: &str) -> impl Fn(result::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("{what}: {e:?}")
}

impl Lt {
    pub fn new(stream: &Arc<CudaStream>) -> Lt {
        Lt { made: None, plans: HashMap::new(), stream: stream.clone() }
    }

    /// The handle and the workspace's address, made on first use.
    fn made(&mut self) -> Option<(sys::cublasLtHandle_t, u64)> {
        if self.made.is_none() {
            // SAFETY: only tries to dlopen the library.
            let present = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
            let handle = present.then(result::create_handle).and_then(|h| h.ok());
            let ws = handle.and_then(|_| self.stream.alloc_zeros::<u8>(WORKSPACE).ok());
            self.made = Some(match (handle, ws) {
                (Some(h), Some(w)) => Ok((h, w)),
                (h, _) => {
                    if let Some(h) = h {
                        unsafe {
                            let _ = result::destroy_handle(h);
                        }
                    }
                    Err(())
                }
            });
        }
        match self.made.as_ref().expect("made above") {
            Ok((h, w)) => Some((*h, w.device_ptr(&self.stream).0)),
            Err(()) => None,
        }
    }

    /// `p.c = p.a · p.b (as `p` says) + bias` in one cuBLASLt call, with `bias` (p.n floats) added
    /// to every row; with `gelu_pre`, `p.c` gets GELU (tanh form) of that sum and `gelu_pre`
    /// (p.m × p.n floats) the sum itself. False (nothing done) where cuBLASLt cannot: then the
    /// caller runs the cuBLAS product, the bias kernel (and the GELU kernel). `bf16`: the
    /// operands are bf16 copies; `tf32`: fp32 operands on TF32 tensor cores. Only single,
    /// overwriting products (batch 1, beta 0).
    pub fn gemm_bias(&mut self, p: &Product, bias: u64, gelu_pre: Option<u64>, bf16: bool, tf32: bool) -> bool {
        // The bias and the aux buffer are read and written in 16-byte vectors by some epilogues,
        // and the aux buffer's leading dimension must be a multiple of 8: others stay out.
        let aux_ok = gelu_pre.is_none_or(|a| alignment(a) >= 16 && p.n.is_multiple_of(8));
        if !enabled() || p.batch > 1 || p.beta != 0.0 || alignment(bias) < 16 || !aux_ok {
            return false;
        }
        let key = Key {
            m: p.m,
            n: p.n,
            k: p.k,
            ta: p.ta == Trans::T,
            tb: p.tb == Trans::T,
            precision: if bf16 { 2 } else { tf32 as u8 },
            align: [alignment(p.b), alignment(p.a), alignment(p.c)],
            gelu: gelu_pre.is_some(),
        };
        let Some((handle, ws)) = self.made() else {
            return false;
        };
        let Some(plan) = self.plans.entry(key).or_insert_with(|| Self::plan(handle, key).ok()).as_ref() else {
            return false;
        };
        let (alpha, beta) = (p.alpha, 0.0f32);
        let r = unsafe {
            let set_ptr = |attr, at: u64| {
                let ptr = at as *const c_void;
                result::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    &ptr as *const *const c_void as *const c_void,
                    std::mem::size_of_val(&ptr),
                )
            };
            use sys::cublasLtMatmulDescAttributes_t as A;
            set_ptr(A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias)
                .and_then(|()| gelu_pre.map_or(Ok(()), |pre| set_ptr(A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, pre)))
                .and_then(|()| {
                    result::matmul(
                        handle,
                        plan.desc,
                        &alpha as *const f32 as *const c_void,
                        &beta as *const f32 as *const c_void,
                        p.b as *const c_void,
                        plan.a,
                        p.a as *const c_void,
                        plan.b,
                        p.c as *const c_void,
                        plan.c,
                        p.c as *mut c_void,
                        plan.c,
                        &plan.algo,
                        ws as *mut c_void,
                        WORKSPACE,
                        self.stream.cu_stream() as sys::cudaStream_t,
                    )
                })
        };
        // A call cuBLASLt refuses (nothing was queued) leaves this shape to cuBLAS from now on,
        // said once; tests/cuda.rs fails when the aligned shapes do not take cuBLASLt.
        if let Err(e) = r {
            eprintln!("warning: cuBLASLt refused a product with bias ({}x{}x{}, {key:?}): {e:?}; using cuBLAS for it", p.m, p.n, p.k);
            self.plans.insert(key, None);
            return false;
        }
        PRODUCTS.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The descriptors of `key`'s product and the heuristic's best algorithm for them.
    fn plan(handle: sys::cublasLtHandle_t, key: Key) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let Key { m, n, k, ta, tb, precision, align, gelu } = key;
        let ab = if precision == 2 { sys::cudaDataType::CUDA_R_16BF } else { sys::cudaDataType::CUDA_R_32F };
        let compute = if precision == 1 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        // Column-major: D (n, m) = op(A') (n, k) · op(B') (k, m), A' = our B, B' = our A.
        let (rows_a, cols_a, ld_a) = if tb { (k, n, k) } else { (n, k, n) };
        let (rows_b, cols_b, ld_b) = if ta { (m, k, m) } else { (k, m, k) };
        let layout = |t, r: usize, c: usize, ld: usize| result::create_matrix_layout(t, r as u64, c as u64, ld as i64);
        // Made empty first, so that whatever is made before a failure is destroyed with it.
        let null = std::ptr::null_mut();
        let mut plan = Plan { desc: null as _, a: null as _, b: null as _, c: null as _, algo: unsafe { std::mem::zeroed() } };
        plan.desc = result::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F).map_err(lt_err("cublasLtMatmulDescCreate"))?;
        plan.a = layout(ab, rows_a, cols_a, ld_a).map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
        plan.b = layout(ab, rows_b, cols_b, ld_b).map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
        plan.c = layout(sys::cudaDataType::CUDA_R_32F, n, m, n).map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
        // cublasOperation_t: 0 = N, 1 = T.
        let (op_a, op_b): (i32, i32) = (tb as i32, ta as i32);
        let epilogue =
            if gelu { sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX_BIAS } else { sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS };
        let bias_type = sys::cudaDataType::CUDA_R_32F;
        unsafe {
            let set = |attr, v: *const c_void, size| result::set_matmul_desc_attribute(plan.desc, attr, v, size);
            set(A::CUBLASLT_MATMUL_DESC_TRANSA, &op_a as *const i32 as *const c_void, 4).map_err(lt_err("TRANSA"))?;
            set(A::CUBLASLT_MATMUL_DESC_TRANSB, &op_b as *const i32 as *const c_void, 4).map_err(lt_err("TRANSB"))?;
            set(A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue as *const _ as *const c_void, std::mem::size_of_val(&epilogue))
                .map_err(lt_err("EPILOGUE"))?;
            set(A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type as *const _ as *const c_void, std::mem::size_of_val(&bias_type))
                .map_err(lt_err("BIAS_DATA_TYPE"))?;
            if gelu {
                // The aux buffer: the pre-activation, fp32, laid out as D (leading dimension n).
                let ld = n as i64;
                set(A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld as *const i64 as *const c_void, 8).map_err(lt_err("EPILOGUE_AUX_LD"))?;
                set(
                    A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE,
                    &bias_type as *const _ as *const c_void,
                    std::mem::size_of_val(&bias_type),
                )
                .map_err(lt_err("EPILOGUE_AUX_DATA_TYPE"))?;
            }
            let pref = result::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            // cuBLASLt reads the workspace size as a u64 and the alignments as u32s.
            let ws = WORKSPACE as u64;
            let found =
                result::set_matmul_pref_attribute(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const u64 as *const c_void, 8)
                    .and_then(|()| {
                        [
                            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align[0]),
                            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align[1]),
                            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align[2]),
                            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align[2]),
                        ]
                        .iter()
                        .try_for_each(|(attr, a)| result::set_matmul_pref_attribute(pref, *attr, a as *const u32 as *const c_void, 4))
                    })
                    .and_then(|()| result::get_matmul_algo_heuristic(handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref));
            let _ = result::destroy_matmul_pref(pref);
            plan.algo = found.map_err(lt_err("cublasLtMatmulAlgoGetHeuristic"))?.algo;
        }
        Ok(plan)
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.clear();
        if let Some(Ok((h, _))) = self.made.take() {
            unsafe {
                let _ = result::destroy_handle(h);
            }
        }
    }
}
