//! What a block keeps between the forward and the backward of each micro-batch in flight.
//!
//! A pipeline stage holds several micro-batches at once (1F1B), so every block kind stashes its
//! activations per micro-batch id. The activation sets are allocated once per shape and then
//! recycled; the (N, C) buffers handed between stages circulate through the unit's [`ActPool`]:
//! the input of a forward is kept with its stash, and after the backward it goes back to the pool.

use crate::backend::pool::ActPool;
use crate::backend::Backend;
use std::collections::HashMap;

/// One micro-batch's activations of some block kind: it knows the (B, T) it was made for.
pub trait Acts {
    fn shape(&self) -> (usize, usize);
}

/// The stashes of one block: live (per micro-batch id, with the forward's input), spare, and the
/// pool its inputs and outputs come from.
pub struct Stashes<B: Backend, A> {
    live: HashMap<u64, (A, B::Buf)>,
    spare: Vec<A>,
    pub pool: ActPool<B>,
}

impl<B: Backend, A: Acts> Default for Stashes<B, A> {
    fn default() -> Self {
        Stashes { live: HashMap::new(), spare: Vec::new(), pool: ActPool::default() }
    }
}

impl<B: Backend, A: Acts> Stashes<B, A> {
    /// A set of activations for (b, t): a spare one of that shape, or a new one from `make`.
    pub fn take(&mut self, b: usize, t: usize, make: impl FnOnce() -> A) -> A {
        match self.spare.iter().position(|a| a.shape() == (b, t)) {
            Some(i) => self.spare.swap_remove(i),
            None => make(),
        }
    }

    /// Keep `acts` and the forward's `input` for micro-batch `mb`'s backward.
    pub fn keep(&mut self, be: &B, mb: u64, acts: A, input: B::Buf) {
        if let Some((old, x)) = self.live.insert(mb, (acts, input)) {
            // A micro-batch id reused before its backward: keep the memory, drop nothing.
            self.recycle(be, old, x);
        }
    }

    /// Micro-batch `mb`'s activations and input, for its backward.
    pub fn remove(&mut self, mb: u64) -> Option<(A, B::Buf)> {
        self.live.remove(&mb)
    }

    /// Return a finished micro-batch's memory: the input to the pool, the activations to spare.
    pub fn recycle(&mut self, be: &B, acts: A, input: B::Buf) {
        self.pool.put(be, input);
        self.spare.push(acts);
    }

    /// Drop micro-batch `mb`'s stash without a backward (evaluation), recycling its memory.
    pub fn forget(&mut self, be: &B, mb: u64) {
        if let Some((a, x)) = self.live.remove(&mb) {
            self.recycle(be, a, x);
        }
    }

    /// Micro-batches stashed (in flight through the block).
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// The attention's saved state or its backward scratch: the probabilities of the materialized
/// algorithm are activations (stored in the stream's storage precision); flash attention's
/// logsumexp is a statistic and stays fp32.
pub fn alloc_attention<B: Backend>(be: &B, len: usize) -> B::Buf {
    match be.attention() {
        crate::backend::Attention::Flash => be.alloc(len),
        crate::backend::Attention::Materialized => be.alloc_act(len),
    }
}
