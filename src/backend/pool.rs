//! Per-device pools of activation buffers, shared by the units and stages on one device.

use super::Backend;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A recycling pool of (N, C) activation and gradient buffers handed between stages.
///
/// A stage takes its output buffer from the pool and puts back the input buffer it no longer
/// needs after backward, so after the first step nothing allocates (buffers circulate).
///
/// A pool belongs to ONE device. In the actor runtime every actor on a device shares that
/// device's pool (clones share), so a buffer can be put back by one stream and taken by another:
/// each free buffer carries the event after its last use, and `take` makes the taking stream wait
/// on it. A buffer handed to another device is copied there (see `runtime::messages`) and sent
/// home with [`ActPool::put_after`], so no device's memory is ever touched by another device's
/// kernels and every device's buffer count stays bounded, however the layers are placed.
pub struct ActPool<B: Backend> {
    inner: Arc<PoolInner<B>>,
}

struct PoolInner<B: Backend> {
    free: Mutex<Vec<(B::Buf, B::Event)>>,
    /// Buffers this pool has allocated over its life (a leak shows as growth after warmup).
    allocated: AtomicUsize,
    /// Bytes copied into this device from other devices.
    peer_bytes_in: AtomicU64,
}

impl<B: Backend> Clone for ActPool<B> {
    fn clone(&self) -> Self {
        ActPool { inner: self.inner.clone() }
    }
}

impl<B: Backend> Default for ActPool<B> {
    fn default() -> Self {
        ActPool {
            inner: Arc::new(PoolInner { free: Mutex::new(Vec::new()), allocated: Default::default(), peer_bytes_in: Default::default() }),
        }
    }
}

impl<B: Backend> ActPool<B> {
    /// A buffer of `n` floats, free for stream `be` to write: a recycled one (after `be` waits
    /// for its last user), or a new activation buffer ([`Backend::alloc_act`]).
    pub fn take(&self, be: &B, n: usize) -> B::Buf {
        let found = {
            let mut free = self.inner.free.lock().expect("pool lock");
            free.iter().position(|(b, _)| B::buf_len(b) == n).map(|i| free.swap_remove(i))
        };
        match found {
            Some((buf, ready)) => {
                be.wait(&ready);
                buf
            }
            None => {
                self.inner.allocated.fetch_add(1, Ordering::Relaxed);
                be.alloc_act(n)
            }
        }
    }

    /// Give back `buf` after the work stream `be` has queued on it so far.
    pub fn put(&self, be: &B, buf: B::Buf) {
        assert!(be.is_local(&buf), "a buffer put into the pool of {} belongs to another device", be.device());
        let ready = be.record();
        self.put_after(buf, ready);
    }

    /// Give back `buf`, free once `ready` has passed (an event of any stream, any device).
    pub fn put_after(&self, buf: B::Buf, ready: B::Event) {
        self.inner.free.lock().expect("pool lock").push((buf, ready));
    }

    /// Buffers allocated by this pool so far.
    pub fn allocated(&self) -> usize {
        self.inner.allocated.load(Ordering::Relaxed)
    }

    /// Count `bytes` copied into this pool's device from another device.
    pub fn note_peer_copy(&self, bytes: u64) {
        self.inner.peer_bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes copied into this pool's device from other devices so far.
    pub fn peer_bytes_in(&self) -> u64 {
        self.inner.peer_bytes_in.load(Ordering::Relaxed)
    }
}
