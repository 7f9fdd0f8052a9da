//! Compute precision (`[precision] compute`): what the matrix products read.
//!
//! taproot keeps llm.c's mixed-precision split between what is *stored* and what is *computed
//! with*:
//! - **fp32 master weights and optimizer state**, always. Checkpoints hold them, so a run can be
//!   resumed under another precision and a checkpoint never depends on the one it was written
//!   under.
//! - **Matrix-product operands in the compute precision.** In `bf16` every operand of every
//!   product (the linear layers forward and backward, the attention products, the head) is
//!   rounded to bfloat16 — round to nearest even — and the product accumulates in fp32 and is
//!   written in fp32 (cuBLAS `CUBLAS_COMPUTE_32F` with bf16 inputs on a GPU). `tf32` rounds the
//!   operands to TF32's 10-bit mantissa (what cuBLAS's TF32 tensor-core mode reads).
//! - **Everything else in fp32**: LayerNorm statistics, softmax and its logsumexp, the loss,
//!   GELU, residual sums, gradient accumulation across micro-batches, norms and updates.
//!
//! Rounding is round-to-nearest-even, not stochastic: the bf16 copy is made afresh from the fp32
//! master at every use, so a rounding error never accumulates into the weights; stochastic
//! rounding pays where the *master* itself is kept in bf16 (llm.c's option), which this scheme
//! does not do.
//!
//! The CPU backend follows the same scheme by rounding the operands it hands to its f32 products
//! ([`Precision::round`]), so CI proves what a bf16 run does to training (loss, growth, checkpoints)
//! without a GPU, and the GPU's bf16 path is tested against it.
//!
//! Activations are stored in fp32 between ops unless `precision.storage = "bf16"`, which the CPU
//! backend emulates (`backend/cpu/storage.rs`) and the CUDA backend does not have yet.

use serde::{Deserialize, Serialize};

/// The precision the matrix products compute in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE fp32 operands and accumulation (the verified reference).
    #[default]
    Fp32,
    /// Operands rounded to TF32 (10-bit mantissa), fp32 accumulation.
    Tf32,
    /// Operands rounded to bfloat16 (7-bit mantissa), fp32 accumulation.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
    pub(crate) fn to_u8(self) -> u8 {
        self as u8
    }
    pub(crate) fn from_u8(v: u8) -> Precision {
        match v {
            1 => Precision::Tf32,
            2 => Precision::Bf16,
            _ => Precision::Fp32,
        }
    }
    /// Round one value as this precision's products read it.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Precision::Fp32 => x,
            Precision::Tf32 => round_mantissa(x, 13),
            Precision::Bf16 => bf16_to_f32(f32_to_bf16(x)),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => anyhow::bail!("unknown precision {s:?} (expected \"fp32\", \"tf32\" or \"bf16\")"),
        }
    }
}

/// Drop the low `bits` of an f32's mantissa, rounding to nearest even (NaN and ±inf kept).
fn round_mantissa(x: f32, bits: u32) -> f32 {
    let u = x.to_bits();
    if (u & 0x7f80_0000) == 0x7f80_0000 {
        return x; // inf or NaN: unchanged
    }
    let half = 1u32 << (bits - 1);
    let lsb = (u >> bits) & 1;
    let r = u.wrapping_add(half - 1 + lsb) & !((1u32 << bits) - 1);
    f32::from_bits(r)
}

/// f32 → bfloat16 bits, round to nearest even; NaN stays NaN (quiet), ±inf stays ±inf, a value
/// beyond bf16's range rounds to ±inf as IEEE rounding does. The CUDA kernel
/// `f32_to_bf16_kernel` computes the same bits.
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16; // NaN: keep sign and make it quiet
    }
    let lsb = (u >> 16) & 1;
    (u.wrapping_add(0x7fff + lsb) >> 16) as u16
}

/// bfloat16 bits → f32 (exact).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even_and_keeps_specials() {
        // 1 + 2^-8 is exactly halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
        assert_eq!(Precision::Bf16.round(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up.
        assert_eq!(Precision::Bf16.round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        // Just above halfway rounds up.
        assert_eq!(Precision::Bf16.round(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 1.0 + 2f32.powi(-7));
        assert_eq!(Precision::Bf16.round(-2.5), -2.5);
        assert!(Precision::Bf16.round(f32::NAN).is_nan());
        assert_eq!(Precision::Bf16.round(f32::INFINITY), f32::INFINITY);
        assert_eq!(Precision::Bf16.round(f32::MAX), f32::INFINITY, "beyond bf16's largest finite value");
        assert_eq!(bf16_to_f32(f32_to_bf16(3.140625)), 3.140625, "a bf16 value is exact");
        // Relative error at most 2^-8 over a spread of magnitudes.
        for i in -200..200 {
            let x = 1.2345f32 * 1.37f32.powi(i);
            let r = Precision::Bf16.round(x);
            assert!(((r - x) / x).abs() <= 2f32.powi(-8), "{x} -> {r}");
        }
    }

    #[test]
    fn tf32_rounding_keeps_ten_mantissa_bits() {
        assert_eq!(Precision::Tf32.round(1.0 + 2f32.powi(-10)), 1.0 + 2f32.powi(-10));
        assert_eq!(Precision::Tf32.round(1.0 + 2f32.powi(-11)), 1.0, "tie to even");
        assert_eq!(Precision::Tf32.round(1.0 + 3.0 * 2f32.powi(-11)), 1.0 + 2f32.powi(-9), "tie to even, upwards");
        assert_eq!(Precision::Fp32.round(1.0 + 2f32.powi(-20)), 1.0 + 2f32.powi(-20));
        assert!(Precision::Tf32.round(f32::NAN).is_nan());
    }

    #[test]
    fn names_round_trip() {
        for p in [Precision::Fp32, Precision::Tf32, Precision::Bf16] {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
            assert_eq!(Precision::from_u8(p.to_u8()), p);
        }
        assert!("fp16".parse::<Precision>().unwrap_err().to_string().contains("fp16"));
    }
}
