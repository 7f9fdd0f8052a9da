//! The device memory of the CUDA backend and what each stream owns besides: f32 and u32
//! buffers, the attention and bf16 operand scratch, and the ring of pinned staging buffers.

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice};
use std::sync::Arc;

/// f32 device memory.
pub struct CudaBuf {
    pub(super) ptr: u64,
    pub(super) len: usize,
    /// The device it lives on (`cuda:N`) and that device's context, for peer copies.
    pub(super) ordinal: usize,
    pub(super) ctx: Arc<CudaContext>,
    pub(super) _mem: CudaSlice<f32>,
}

/// u32 device memory (token ids).
pub struct CudaIds {
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) _mem: CudaSlice<u32>,
}

/// Scratch the attention ops need beyond what the trait passes (permuted q, k, v and their
/// gradients), grown on demand and owned by the stream.
#[derive(Default)]
pub(super) struct AttnScratch {
    pub(super) buf: Option<CudaSlice<f32>>,
    pub(super) len: usize,
}

/// bf16 copies of product operands, grown on demand and owned by the stream. Three slots: a
/// product reads two operands, and a linear layer's backward reads dout, w and inp, converting
/// dout once for both its products.
#[derive(Default)]
pub(super) struct Bf16Scratch {
    pub(super) slots: [Option<CudaSlice<u16>>; 3],
}

/// Uploads of token ids in flight at once per stream before the host waits on the oldest.
pub(super) const STAGING_SLOTS: usize = 8;

/// One pinned host buffer for asynchronous uploads, and the event after its last copy.
pub(super) struct StagingSlot {
    pub(super) host: cudarc::driver::PinnedHostSlice<u32>,
    pub(super) done: CudaEvent,
}

/// A ring of pinned staging buffers owned by a stream.
#[derive(Default)]
pub(super) struct Staging {
    pub(super) slots: Vec<Option<StagingSlot>>,
    pub(super) next: usize,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The pinned memory is freed right after: let the copies still reading it finish.
        for slot in self.slots.iter().flatten() {
            let _ = slot.done.synchronize();
        }
    }
}
