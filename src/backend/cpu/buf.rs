//! The CPU backend's memory: f32 buffers (with the stream-order record of each, and whether it
//! stores bf16), token-id buffers, the raw slices ops make of views, and a stream's record of
//! its open ops and their bf16 writes (used by `storage.rs`).

use super::order;
use crate::backend::View;
use std::cell::{RefCell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Mutex;

/// f32 memory of the CPU backend.
pub struct CpuBuf {
    data: UnsafeCell<Vec<f32>>,
    /// The CPU "device" index the buffer belongs to (`cpu:N`). Several CPU devices stand in for
    /// several GPUs in tests: an op that mixes buffers of two devices fails, exactly where a GPU
    /// without peer access would fault, so the hand-off protocol (copy across devices, never
    /// read across them) is checked on every CI run.
    pub(super) device: u32,
    /// Which streams wrote and read it last (stream-order checking, see [`order`]).
    pub(super) access: RefCell<order::Access>,
    /// Whether it stores bf16 (an activation buffer under `precision.storage = "bf16"`): every
    /// op's writes to it are rounded to bf16 when the op ends (`storage.rs`).
    pub(super) bf16: bool,
}

// SAFETY: the Vec is owned; moving it to another thread is fine. CpuBuf is deliberately not Sync.
unsafe impl Send for CpuBuf {}

impl CpuBuf {
    pub(super) fn new(n: usize, device: u32, stream: &order::Stream, bf16: bool) -> Self {
        CpuBuf { data: UnsafeCell::new(vec![0.0; n]), device, access: RefCell::new(order::Access::born(stream)), bf16 }
    }
    pub(super) fn len(&self) -> usize {
        // SAFETY: reading the length never races: only this thread can touch the buffer.
        unsafe { (*self.data.get()).len() }
    }
    pub(super) fn ptr(&self) -> *mut f32 {
        // SAFETY: as above; the pointer is only dereferenced inside ops under the overlap rules.
        unsafe { (*self.data.get()).as_mut_ptr() }
    }
}

/// u32 memory of the CPU backend (token ids).
pub struct CpuIds {
    pub(super) data: UnsafeCell<Vec<u32>>,
}
unsafe impl Send for CpuIds {}

impl CpuIds {
    pub(super) fn slice(&self) -> &[u32] {
        // SAFETY: ids are only written by `upload_ids`, which takes no other borrow.
        unsafe { &*self.data.get() }
    }
}

pub(super) type V<'a> = View<'a, CpuBuf>;

fn check_bounds(v: &V) {
    assert!(v.off + v.len <= v.buf.len(), "view [{}, {}) outside a buffer of {}", v.off, v.off + v.len, v.buf.len());
}

/// Read-only slice of a view (no stream-order check: ops use [`CpuBackend::rd`]).
///
/// SAFETY: the caller must not hold a mutable slice overlapping it (ops check with [`disjoint`]).
pub(super) unsafe fn raw_rd<'a>(v: V<'a>) -> &'a [f32] {
    check_bounds(&v);
    std::slice::from_raw_parts(v.buf.ptr().add(v.off), v.len)
}

/// Mutable slice of a view. SAFETY: as [`raw_rd`]; the caller guarantees no overlapping slice lives.
#[allow(clippy::mut_from_ref)]
pub(super) unsafe fn raw_wr<'a>(v: V<'a>) -> &'a mut [f32] {
    check_bounds(&v);
    std::slice::from_raw_parts_mut(v.buf.ptr().add(v.off), v.len)
}

/// Assert that the output view `out` overlaps none of `others` (the aliasing rule of the trait),
/// and that all of them live on one device (only [`Backend::copy_peer`] crosses devices).
pub(crate) fn disjoint(out: &V, others: &[&V]) {
    for o in others {
        assert!(
            out.buf.device == o.buf.device,
            "an op mixes buffers of cpu:{} and cpu:{}: a buffer from another device must be copied in first (copy_peer)",
            out.buf.device,
            o.buf.device
        );
        if std::ptr::eq(out.buf, o.buf) {
            let overlap = out.off < o.off + o.len && o.off < out.off + out.len;
            assert!(
                !overlap || out.len == 0 || o.len == 0,
                "output view [{}, {}) overlaps an input view [{}, {}) of the same buffer",
                out.off,
                out.off + out.len,
                o.off,
                o.off + o.len
            );
        }
    }
}

/// A stream's open op scopes and the bf16 views written inside them, rounded when the
/// outermost scope ends (`storage.rs`).
#[derive(Debug, Default)]
pub(super) struct Storage {
    pub(super) depth: AtomicUsize,
    pub(super) pending: Mutex<Vec<(usize, usize)>>,
    /// Whether `pending` has views to round (read without the lock at every op's end).
    pub(super) noted: AtomicBool,
}
