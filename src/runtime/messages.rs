//! What flows between the actors of a pipeline: activations and gradients (with the event the
//! receiving stream must wait on), and the [`Peer`] a stage hands them to.
//!
//! The pipeline is a ring: ends (embedding) → layer 0 → … → layer L-1 → ends (head), and
//! gradients flow back the same way. A stage knows only its two neighbours; growth relinks them.
//!
//! Across a device boundary an [`Activation`] is copied into the receiver's device and the
//! original is returned to the sender's device pool (see [`Activation::receive`]).

use super::ends::EndsMsg;
use super::layer::LayerMsg;
use crate::backend::Backend;
use crate::model::ActPool;
use ractor::ActorRef;

/// An (N, C) activation or gradient buffer handed from one stage to the next, plus the point in
/// the sender's stream after which it is ready. The receiver makes its own stream wait on the
/// event before touching the buffer (checked, not needed, on CPU; no host synchronisation on a
/// GPU).
///
/// Across devices the receiver never computes on the sender's memory: it copies the buffer into
/// one of its own device's pool (a peer copy on GPUs) and sends the original back to `home`, the
/// sender's device pool, free once the copy has read it. Every device keeps its own buffers, and
/// their number stays bounded: a device gives one up for each buffer that arrives from another,
/// and in a ring it receives exactly as many as it sends.
pub struct Activation<B: Backend> {
    pub buf: B::Buf,
    pub ready: B::Event,
    /// The micro-batch shape: B sequences of T tokens (the buffer is (B, T, C)).
    pub b: usize,
    pub t: usize,
    /// The pool of the device `buf` lives on.
    pub home: ActPool<B>,
}

impl<B: Backend> Activation<B> {
    /// Package `buf`, written on stream `be`, for another stage; `home` is `be`'s device pool.
    pub fn send(be: &B, buf: B::Buf, b: usize, t: usize, home: &ActPool<B>) -> Self {
        Activation { ready: be.record(), buf, b, t, home: home.clone() }
    }

    /// Unpack on the receiving stream `be`, whose device pool is `pool`: the buffer itself when it
    /// is on `be`'s device, else a local copy (and the original goes home).
    pub fn receive(self, be: &B, pool: &ActPool<B>) -> B::Buf {
        be.wait(&self.ready);
        if be.is_local(&self.buf) {
            return self.buf;
        }
        let n = B::buf_len(&self.buf);
        let local = pool.take(be, n);
        be.copy_peer(B::whole(&local), B::whole(&self.buf));
        pool.note_peer_copy(4 * n as u64);
        // Free for its own device once this stream's copy has read it.
        self.home.put_after(self.buf, be.record());
        local
    }
}

/// A neighbour in the ring.
pub enum Peer<B: Backend> {
    Layer(ActorRef<LayerMsg<B>>),
    Ends(ActorRef<EndsMsg<B>>),
}

impl<B: Backend> Clone for Peer<B> {
    fn clone(&self) -> Self {
        match self {
            Peer::Layer(a) => Peer::Layer(a.clone()),
            Peer::Ends(a) => Peer::Ends(a.clone()),
        }
    }
}

impl<B: Backend> Peer<B> {
    /// Hand an activation downstream (toward the head).
    ///
    /// If the neighbour is gone the message is dropped: that neighbour's own failure reaches the
    /// supervisor, which names it and stops or rebuilds the pipeline; failing here too would
    /// only race it with a less precise error.
    pub fn forward(&self, mb: u64, x: Activation<B>, eval: bool) -> anyhow::Result<()> {
        let _ = match self {
            Peer::Layer(a) => a.cast(LayerMsg::Forward { mb, x, eval }).map_err(drop),
            Peer::Ends(a) => a.cast(EndsMsg::HeadForward { mb, x }).map_err(drop),
        };
        Ok(())
    }

    /// Hand a gradient upstream (toward the embedding). A gone neighbour: as [`Peer::forward`].
    pub fn backward(&self, mb: u64, grad: Activation<B>) -> anyhow::Result<()> {
        let _ = match self {
            Peer::Layer(a) => a.cast(LayerMsg::Backward { mb, grad }).map_err(drop),
            Peer::Ends(a) => a.cast(EndsMsg::EmbedBackward { mb, grad }).map_err(drop),
        };
        Ok(())
    }
}

/// Run CPU-heavy work without stalling the async workers (the metrics endpoint, other actors'
/// mailboxes): the worker thread hands its other tasks off while this closure runs.
pub fn compute<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
