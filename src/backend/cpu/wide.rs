//! Elementwise loops compiled twice: for the build's baseline (x86-64-v3: AVX2 + FMA, 8 lanes)
//! and for AVX-512 (16 lanes), chosen at run time by what the CPU has. The loops are plain Rust
//! that the compiler vectorises; the wider copy does the same arithmetic per element (no
//! reduction is reordered: float additions are never reassociated), so both give the same bits —
//! a test checks it by switching the wide copy off.

use std::sync::atomic::{AtomicU8, Ordering};

/// 0: not probed yet, 1: use the AVX-512 copies, 2: do not.
static WIDE: AtomicU8 = AtomicU8::new(0);

/// Whether the AVX-512 copies run: the CPU has AVX-512F and they were not switched off.
#[inline]
pub fn enabled() -> bool {
    match WIDE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = detect();
            WIDE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

fn detect() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Use the AVX-512 copies (where the CPU has them) or not; for tests that compare the two. The
/// attention's register-tiled products (`microkernel.rs`) follow the same switch.
pub fn set_enabled(on: bool) {
    WIDE.store(if on && detect() { 1 } else { 2 }, Ordering::Relaxed);
}

/// `wide! { fn name(args) -> R { body } }` defines `name` so that `body` runs from a copy
/// compiled with AVX-512 enabled when [`enabled`], else from the baseline copy. Arguments are
/// plain `name: Type` pairs; `body` sees only them and module-level items.
macro_rules! wide {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::backend::cpu::wide::enabled() {
                    // SAFETY: the CPU has AVX-512F (`enabled` checked it).
                    return unsafe { avx512($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use wide;

/// Lanes of the AVX-512 kernels' accumulators (one 512-bit vector), which their plain-loop
/// copies keep as arrays.
pub(crate) const LANES: usize = 16;

/// The 16 lane sums added by a fixed tree: halves, then quarters, then pairs. The AVX-512
/// kernels add a vector's lanes by the same tree ([`x86::lanes_sum`]), so both give the same bits.
#[inline(always)]
pub(crate) fn lanes_sum(s: &[f32; LANES]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|k| s[k] + s[k + 8]);
    let q: [f32; 4] = std::array::from_fn(|k| h[k] + h[k + 4]);
    (q[0] + q[2]) + (q[1] + q[3])
}

/// Helpers of the AVX-512 kernels (attention's softmax rows, the narrow products).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// The lanes below `n` (≤ 16).
    #[inline]
    pub(crate) fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// [`super::lanes_sum`] of a vector's lanes: the same tree.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn lanes_sum(a: __m512) -> f32 {
        let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, a);
        let h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_castps512_ps256(hi));
        let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let r = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps::<1>(r, r)))
    }
}
