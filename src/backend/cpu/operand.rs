//! Matrix-product operands as a stream's precision reads them: the fp32 slice itself, or a copy
//! rounded to bf16/TF32 in a buffer lent by the stream's pool (so an emulated step allocates only
//! until the pool holds its largest operands).

use super::CpuBackend;
use crate::backend::{Backend, Precision};
use std::sync::Mutex;

/// A matrix-product operand as the stream reads it: the slice itself (fp32), or a rounded copy
/// in a buffer lent by the stream's pool and given back when dropped.
pub(super) enum Operand<'a> {
    Slice(&'a [f32]),
    Rounded(Vec<f32>, &'a Mutex<Vec<Vec<f32>>>),
}

impl std::ops::Deref for Operand<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Operand::Slice(x) => x,
            Operand::Rounded(v, _) => v,
        }
    }
}

impl Drop for Operand<'_> {
    fn drop(&mut self) {
        if let Operand::Rounded(v, pool) = self {
            pool.lock().expect("operand pool lock").push(std::mem::take(v));
        }
    }
}

impl CpuBackend {
    /// An operand of a matrix product as this stream's precision reads it: the slice itself in
    /// fp32, a rounded copy otherwise (emulating a device that reads bf16 or TF32 operands).
    pub(super) fn operand<'a>(&'a self, x: &'a [f32]) -> Operand<'a> {
        match Backend::precision(self) {
            Precision::Fp32 => Operand::Slice(x),
            p => {
                let mut v = self.spare.lock().expect("operand pool lock").pop().unwrap_or_default();
                v.clear();
                v.extend(x.iter().map(|&a| p.round(a)));
                Operand::Rounded(v, &self.spare)
            }
        }
    }
}
