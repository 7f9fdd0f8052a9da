//! Fills: a buffer set to one value, in parallel, by plain stores or by streaming stores that
//! skip the cache (`Backend::fill`, `Backend::zero_grads`).

use crate::backend::cpu::kernels::CHUNK;
use rayon::prelude::*;

/// x = value everywhere, in parallel (zeroing a large model's gradients is a memory-bound pass).
/// From [`STREAM_MIN`] floats on, by streaming stores that skip the cache: a buffer that size
/// would not stay there, and plain stores first read every line they write (124M-sized
/// gradients, 2 cores: 27 → 11 ms per 500 MB).
pub fn fill(x: &mut [f32], value: f32) {
    fill_past_cache(x, value, STREAM_MIN)
}

/// [`fill`] by streaming stores from `stream_min` floats on.
pub fn fill_past_cache(x: &mut [f32], value: f32, stream_min: usize) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    if x.len() >= stream_min {
        // SAFETY: the build enables AVX (checked above at compile time).
        return x.par_chunks_mut(CHUNK * 16).for_each(|d| unsafe { stream_fill(d, value) });
    }
    x.par_chunks_mut(CHUNK * 16).for_each(|d| d.fill(value));
}

/// The fewest floats that [`fill`] writes by streaming stores (8 MB: a GPT-2 124M block's
/// gradients; the demo's stay in cache).
const STREAM_MIN: usize = 1 << 21;

/// The fewest floats of parameter gradients that `Backend::zero_grads` writes by streaming
/// stores: they are next read after a whole forward pass, when they would have left the cache.
pub const GRADS_STREAM_MIN: usize = 1 << 16;

/// `d.fill(value)` by non-temporal stores for the 32-byte-aligned body. SAFETY: the CPU has AVX.
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
#[target_feature(enable = "avx")]
unsafe fn stream_fill(d: &mut [f32], value: f32) {
    use std::arch::x86_64::{_mm256_set1_ps, _mm256_stream_ps, _mm_sfence};
    let head = d.as_ptr().align_offset(32).min(d.len());
    let (head, body) = d.split_at_mut(head);
    head.fill(value);
    let mut tail = body.chunks_exact_mut(8);
    let v = _mm256_set1_ps(value);
    for c in &mut tail {
        // SAFETY: each chunk is 8 floats at a 32-byte-aligned address (the body starts aligned).
        unsafe { _mm256_stream_ps(c.as_mut_ptr(), v) };
    }
    tail.into_remainder().fill(value);
    // Streaming stores are weakly ordered: fence them before anyone reads the buffer.
    _mm_sfence();
}
