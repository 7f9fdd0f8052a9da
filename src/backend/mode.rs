//! A stream's compute settings: its attention algorithm, its precision and its activations'
//! storage, read and set
//! through `&self` (ops take the stream by shared reference).

use crate::backend::precision::Precision;

/// How attention keeps what its backward needs (`kernels.attention`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attention {
    /// The (B, NH, T, T) probabilities are written by the forward and read by the backward
    /// (products through the backend's matrix multiply). The verified reference.
    #[default]
    Materialized,
    /// FlashAttention-2's algorithm: tiles with an online softmax; the forward keeps only the
    /// (B, NH, T) logsumexp and the backward recomputes the probabilities from it. On CUDA it
    /// runs on bf16 tensor cores (precision `bf16`, head size 64 or 128).
    Flash,
}

/// A stream's compute settings — its precision and attention algorithm — read and set through
/// `&self` (ops take the stream by shared reference). Both backends keep one per stream.
#[derive(Debug, Default)]
pub struct StreamMode {
    precision: std::sync::atomic::AtomicU8,
    /// What activations are stored in (`precision.storage`).
    storage: std::sync::atomic::AtomicU8,
    flash: std::sync::atomic::AtomicBool,
}

impl StreamMode {
    pub fn precision(&self) -> Precision {
        Precision::from_u8(self.precision.load(std::sync::atomic::Ordering::Relaxed))
    }
    pub fn set_precision(&self, p: Precision) {
        self.precision.store(p.to_u8(), std::sync::atomic::Ordering::Relaxed);
    }
    pub fn storage(&self) -> Precision {
        Precision::from_u8(self.storage.load(std::sync::atomic::Ordering::Relaxed))
    }
    pub fn set_storage(&self, p: Precision) {
        self.storage.store(p.to_u8(), std::sync::atomic::Ordering::Relaxed);
    }
    pub fn attention(&self) -> Attention {
        match self.flash.load(std::sync::atomic::Ordering::Relaxed) {
            true => Attention::Flash,
            false => Attention::Materialized,
        }
    }
    pub fn set_attention(&self, a: Attention) {
        self.flash.store(a == Attention::Flash, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Attention {
    pub fn name(self) -> &'static str {
        match self {
            Attention::Materialized => "materialized",
            Attention::Flash => "flash",
        }
    }
}
