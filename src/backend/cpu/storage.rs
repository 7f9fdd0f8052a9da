//! bf16 storage on the CPU (`precision.storage = "bf16"`): the values a GPU's bf16 activation
//! buffers would hold, in f32 buffers.
//!
//! A buffer from [`Backend::alloc_act`](crate::backend::Backend::alloc_act) on a stream whose
//! storage is bf16 is marked as storing bf16. Every op runs inside a [`Scope`] (the op's entry
//! in the profile, too); each view of a marked buffer that the op writes is noted when the op
//! takes it ([`CpuBackend::wr`]), and when the outermost scope ends (an op called from inside
//! another is part of it) the noted views are rounded to bf16, round to nearest even. So what
//! the next op reads is exactly what a bf16 buffer would hand it, while each op computes in f32
//! as a GPU kernel does between its bf16 loads and stores. Parameters, their gradients, the
//! optimizer's state and the small statistics a backward needs (LayerNorm's mean and 1/σ,
//! attention's logsumexp, the routing weights) are plain `alloc` buffers and stay fp32, as in
//! llm.c's scheme.

use super::buf::{Storage, V};
use super::{profile, CpuBackend};
use crate::backend::precision::{bf16_to_f32, f32_to_bf16};
use rayon::prelude::*;
use std::sync::atomic::Ordering;

/// An op in progress on a CPU stream (see the module docs).
pub(super) struct Scope<'a> {
    storage: &'a Storage,
    _profile: profile::Guard,
}

impl CpuBackend {
    /// Open the scope of op `name`.
    pub(super) fn op(&self, name: &'static str) -> Scope<'_> {
        self.storage.depth.fetch_add(1, Ordering::Relaxed);
        Scope { storage: &self.storage, _profile: profile::op(name) }
    }

    /// [`CpuBackend::op`] under a name built only when profiling is on.
    pub(super) fn op_named(&self, name: impl FnOnce() -> String) -> Scope<'_> {
        self.storage.depth.fetch_add(1, Ordering::Relaxed);
        Scope { storage: &self.storage, _profile: profile::op_named(name) }
    }

    /// Note that the current op writes `v`, a view of a bf16 buffer.
    pub(super) fn note_bf16_write(&self, v: &V) {
        assert!(
            self.storage.depth.load(Ordering::Relaxed) > 0,
            "a CPU op wrote a bf16 activation buffer outside an op scope (its writes would never be rounded)"
        );
        let at = v.buf.ptr() as usize + 4 * v.off;
        self.storage.pending.lock().unwrap_or_else(|e| e.into_inner()).push((at, v.len));
        self.storage.noted.store(true, Ordering::Relaxed);
    }
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        // Nothing to do inside another op, or when the op wrote no bf16 buffer (always, in fp32
        // storage: no lock is taken then).
        if self.storage.depth.fetch_sub(1, Ordering::Relaxed) != 1 || !self.storage.noted.swap(false, Ordering::Relaxed) {
            return;
        }
        // Drained in place, so the list keeps its capacity and a bf16 step allocates nothing
        // here. The lock is held while rounding: only this stream's ops note into it, and the
        // stream's op has ended.
        let mut pending = self.storage.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (at, len) in pending.drain(..) {
            // SAFETY: a view an op of this stream wrote, of a buffer the op's caller still holds
            // (the op has returned into this scope's end, so no slice of it is alive).
            let x = unsafe { std::slice::from_raw_parts_mut(at as *mut f32, len) };
            round_to_bf16(x);
        }
    }
}

/// Round every value to bf16 (round to nearest even), in place.
fn round_to_bf16(x: &mut [f32]) {
    let round = |c: &mut [f32]| c.iter_mut().for_each(|v| *v = bf16_to_f32(f32_to_bf16(*v)));
    if x.len() >= 1 << 16 {
        x.par_chunks_mut(1 << 14).for_each(round);
    } else {
        round(x);
    }
}
