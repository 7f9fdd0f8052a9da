//! Views into device buffers and the grouped operands built from them.

use crate::backend::Backend;

/// One segment of [`Backend::matmul_forward_segments`]: `rows` rows of `inp` through the weight
/// `w` into `out`.
pub struct Segment<'a, Buf> {
    pub out: View<'a, Buf>,
    pub inp: View<'a, Buf>,
    pub w: View<'a, Buf>,
    pub rows: usize,
}

/// The operands of [`Backend::moe_combine_backward`] (see there), handed as one to
/// [`Backend::moe_combine_backward_segments`].
pub struct MoeCombine<'a, B: Backend> {
    pub dys: View<'a, B::Buf>,
    pub dweights: View<'a, B::Buf>,
    pub dout: View<'a, B::Buf>,
    pub ys: View<'a, B::Buf>,
    pub slots: &'a B::Ids,
    pub weights: View<'a, B::Buf>,
    pub n: usize,
    pub k: usize,
}

/// A window into a device buffer: `len` elements starting at `off`.
pub struct View<'a, Buf> {
    pub buf: &'a Buf,
    pub off: usize,
    pub len: usize,
}

impl<Buf> Clone for View<'_, Buf> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<Buf> Copy for View<'_, Buf> {}

impl<'a, Buf> View<'a, Buf> {
    pub fn new(buf: &'a Buf, off: usize, len: usize) -> Self {
        View { buf, off, len }
    }
    /// A sub-window `[start, start+len)` relative to this view.
    pub fn sub(&self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.len, "sub-view [{start}, {}) outside a view of {}", start + len, self.len);
        View { buf: self.buf, off: self.off + start, len }
    }
}

/// Where a view lives on a device, for collectives that run there (NCCL): the address of its
/// first float, its length in floats, and the backend's stream (a `CUstream`), on which the
/// collective is ordered after the ops that wrote the view.
#[derive(Clone, Copy, Debug)]
pub struct DeviceView {
    pub ptr: u64,
    pub len: usize,
    pub stream: *mut std::ffi::c_void,
}
