//! The choice of where replicas sum their gradients (`parallel.collectives`), made once per
//! process before a run starts, and the one device collective the runtime calls.

use crate::backend::DeviceView;
use crate::config::Collectives;
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static ON_DEVICE: AtomicBool = AtomicBool::new(false);
/// `faults.stall_collectives_ms`: each device all-reduce waits this long on its stream first.
static STALL_MS: AtomicU64 = AtomicU64::new(0);

/// A fault for tests (`faults.stall_collectives_ms`): hold each device all-reduce's stream for
/// `ms` milliseconds before it, as a stopped replica would hold the others (the NCCL watchdog
/// must then stop the run). 0: none.
pub fn set_collective_stall(ms: u64) {
    STALL_MS.store(ms, Ordering::Relaxed);
}

/// Set this process's collectives from its config. `nccl` must be loadable here: a run that
/// asks for it and cannot have it stops before it starts, naming the key.
pub fn set_collectives(c: Collectives) -> Result<()> {
    if c == Collectives::Nccl {
        #[cfg(feature = "nccl")]
        if let Err(e) = super::nccl::version() {
            bail!("`parallel.collectives` = \"nccl\": {e}");
        }
        #[cfg(not(feature = "nccl"))]
        bail!("`parallel.collectives` = \"nccl\" needs a build with the `nccl` feature");
    }
    ON_DEVICE.store(c == Collectives::Nccl, Ordering::Relaxed);
    Ok(())
}

/// Whether gradients are summed on the device (`parallel.collectives = "nccl"`).
pub fn on_device() -> bool {
    ON_DEVICE.load(Ordering::Relaxed)
}

/// Sum `v` in place over this stage's replicas, on `v`'s stream. Every replica must call this
/// for the same views (the same sizes) in the same order.
pub fn all_reduce_in_place(v: DeviceView) -> Result<()> {
    #[cfg(feature = "nccl")]
    {
        static QUEUED: AtomicU64 = AtomicU64::new(0);
        super::nccl::with_replica_comm(|comm| {
            let stall = STALL_MS.load(Ordering::Relaxed);
            if stall > 0 {
                super::nccl_watch::stall_stream(v.stream, stall)?;
            }
            // SAFETY: `v` is a live device view of `v.len` floats on the comm's device (one device
            // per process, checked by validation), ordered on its own stream.
            unsafe { comm.all_reduce_sum(v.ptr, v.ptr, v.len, super::nccl::DataType::F32, v.stream)? };
            let n = QUEUED.fetch_add(1, Ordering::Relaxed) + 1;
            super::nccl_watch::watch_all_reduce(format!("NCCL all-reduce #{n} ({} floats)", v.len), v.stream, comm)
        })
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = v;
        bail!("gradients on the device need a build with the `nccl` feature")
    }
}
