//! The CUDA devices of a process: the kernel source and its NVRTC compile, the driver and
//! library probes, one context per device (kernels loaded once, peer access between devices),
//! and the memory each one uses.

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernel source, compiled at run time by NVRTC.
pub const KERNELS_CU: &str = concat!(include_str!("kernels.cu"), include_str!("flash.cu"));

/// Every kernel the backend launches (the CI test compiles the source and looks each one up).
pub const KERNEL_NAMES: &[&str] = &[
    "fill_kernel",
    "add_kernel",
    "axpby_kernel",
    "sumsq_kernel",
    "scale_by_rnorm_kernel",
    "add_bias_kernel",
    "bias_backward_kernel",
    "encoder_forward_kernel",
    "encoder_backward_kernel",
    "layernorm_forward_kernel",
    "layernorm_backward_kernel",
    "permute_qkv_kernel",
    "unpermute_qkv_kernel",
    "unpermute_y_kernel",
    "permute_y_kernel",
    "softmax_causal_kernel",
    "softmax_backward_kernel",
    "gelu_forward_kernel",
    "gelu_backward_kernel",
    "rmsnorm_forward_kernel",
    "rmsnorm_backward_kernel",
    "head_rmsnorm_forward_kernel",
    "head_rmsnorm_dw_kernel",
    "head_rmsnorm_backward_kernel",
    "gather_rows_kernel",
    "moe_combine_kernel",
    "moe_combine_dys_kernel",
    "moe_combine_dweights_kernel",
    "rope_kernel",
    "gqa_expand_kernel",
    "gqa_reduce_kernel",
    "swiglu_forward_kernel",
    "swiglu_backward_kernel",
    "crossentropy_kernel",
    "adamw_kernel",
    "momentum_kernel",
    "apply_update_kernel",
    "f32_to_bf16_kernel",
    "heads_to_bf16_kernel",
    "flash_fwd_64_kernel",
    "flash_fwd_128_kernel",
    "flash_rowdot_kernel",
    "flash_bwd_64_kernel",
    "flash_bwd_128_kernel",
];

/// Dynamic shared memory of the flash backward for head size `hs` (`FA_BWD_SMEM` in flash.cu):
/// Q, dO and K tiles of 64 × (hs + 8) bf16, a 64 × 72 bf16 dS tile, 64 lse and 64 D floats.
pub(super) fn flash_bwd_smem(hs: usize) -> usize {
    3 * 64 * (hs + 8) * 2 + 64 * 72 * 2 + 2 * 64 * 4
}

/// Compile the kernel source to PTX for `arch` (e.g. `sm_90`) with NVRTC. Needs only libnvrtc,
/// not a GPU: this is what CI runs.
pub fn compile_kernels(arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    if !nvrtc_present() {
        bail!("libnvrtc could not be loaded: add the directory holding libnvrtc.so (e.g. the `nvidia-cuda-nvrtc` pip package's nvidia/cu13/lib) to LD_LIBRARY_PATH");
    }
    let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch), use_fast_math: Some(false), ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(KERNELS_CU, opts).map_err(|e| anyhow!("NVRTC failed to compile the CUDA kernels for {arch}: {e}"))
}

/// Whether libnvrtc can be loaded (through LD_LIBRARY_PATH and the system paths).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// Whether libcuda (the driver) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// Number of CUDA devices, or an error naming the problem.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        bail!("no CUDA driver: libcuda.so could not be loaded (is this a GPU machine? check LD_LIBRARY_PATH)");
    }
    let n = CudaContext::device_count().map_err(|e| anyhow!("cuInit / device count failed: {e:?}"))?;
    Ok(n as usize)
}

/// One device's context, kernels and a cuBLAS handle per stream, shared by its streams.
pub(super) struct Device {
    pub(super) ctx: Arc<CudaContext>,
    _module: Arc<CudaModule>,
    pub(super) funcs: HashMap<&'static str, CudaFunction>,
}

fn devices() -> &'static Mutex<HashMap<usize, Arc<Device>>> {
    static D: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
    D.get_or_init(|| Mutex::new(HashMap::new()))
}

fn arch_name(cc: (i32, i32)) -> &'static str {
    match cc {
        (9, 0) => "sm_90",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        (7, 5) => "sm_75",
        (7, 0) => "sm_70",
        _ => "sm_80",
    }
}

pub(super) fn open_device(ordinal: usize) -> Result<Arc<Device>> {
    let mut map = devices().lock().expect("device map lock");
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let n = device_count()?;
    if ordinal >= n {
        bail!("device cuda:{ordinal} does not exist: this machine has {n} CUDA device(s)");
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("creating a context on cuda:{ordinal}: {e:?}"))?;
    // Ordering across streams is ours (events at hand-offs), not cudarc's per-buffer tracking.
    unsafe { ctx.disable_event_tracking() };
    let cc = ctx.compute_capability().map_err(|e| anyhow!("{e:?}"))?;
    let ptx = compile_kernels(arch_name(cc))?;
    let module = ctx.load_module(ptx).map_err(|e| anyhow!("loading the kernels on cuda:{ordinal}: {e:?}"))?;
    let mut funcs = HashMap::new();
    for name in KERNEL_NAMES {
        funcs.insert(*name, module.load_function(name).map_err(|e| anyhow!("kernel {name}: {e:?}"))?);
    }
    // The flash backward for head size 128 takes more than the default 48 KiB of shared memory.
    for (name, hs) in [("flash_bwd_64_kernel", 64), ("flash_bwd_128_kernel", 128)] {
        funcs[name]
            .set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, flash_bwd_smem(hs) as i32)
            .map_err(|e| anyhow!("cuda:{ordinal}: allowing {} bytes of shared memory to {name}: {e:?}", flash_bwd_smem(hs)))?;
    }
    // Let this device read its peers' memory (activations handed across devices).
    for (other, d) in map.iter() {
        let _ = enable_peer(&ctx, &d.ctx);
        let _ = enable_peer(&d.ctx, &ctx);
        let _ = other;
    }
    let dev = Arc::new(Device { ctx, _module: module, funcs });
    map.insert(ordinal, dev.clone());
    Ok(dev)
}

/// Bytes in use on every CUDA device this process has opened: (device name, total − free).
/// Feeds `taproot_device_memory_used_bytes` in the daemon.
pub fn memory_used() -> Vec<(String, u64)> {
    let map = devices().lock().expect("device map lock");
    let mut out: Vec<(String, u64)> = map
        .iter()
        .filter_map(|(ordinal, d)| d.ctx.mem_get_info().ok().map(|(free, total)| (format!("cuda:{ordinal}"), (total - free) as u64)))
        .collect();
    out.sort();
    out
}

fn enable_peer(from: &Arc<CudaContext>, to: &Arc<CudaContext>) -> Result<()> {
    from.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
    let mut can = 0i32;
    unsafe {
        sys::cuDeviceCanAccessPeer(&mut can, from.cu_device(), to.cu_device()).result().map_err(|e| anyhow!("{e:?}"))?;
        if can == 1 {
            let r = sys::cuCtxEnablePeerAccess(to.cu_ctx(), 0);
            if r != sys::CUresult::CUDA_SUCCESS && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
                bail!("cuCtxEnablePeerAccess: {r:?}");
            }
        }
    }
    Ok(())
}
