//! What flows between the actors of a pipeline: activations and gradients (with the event the
//! receiving stream must wait on), and the [`Peer`] a stage hands them to.
//!
//! The pipeline is a ring: ends (embedding) → layer 0 → … → layer L-1 → ends (head), and
//! gradients flow back the same way. A stage knows only its two neighbours; growth relinks them.

use super::ends::EndsMsg;
use super::layer::LayerMsg;
use crate::backend::Backend;
use ractor::ActorRef;

/// An (N, C) activation or gradient buffer handed from one stage to the next, plus the point in
/// the sender's stream after which it is ready. The receiver makes its own stream wait on the
/// event before touching the buffer (a no-op on CPU; no host synchronisation on a GPU).
pub struct Activation<B: Backend> {
    pub buf: B::Buf,
    pub ready: B::Event,
    /// The micro-batch shape: B sequences of T tokens (the buffer is (B, T, C)).
    pub b: usize,
    pub t: usize,
}

impl<B: Backend> Activation<B> {
    /// Package `buf`, written on stream `be`, for another stage.
    pub fn send(be: &B, buf: B::Buf, b: usize, t: usize) -> Self {
        Activation { ready: be.record(), buf, b, t }
    }
    /// Unpack on the receiving stream `be`.
    pub fn receive(self, be: &B) -> B::Buf {
        be.wait(&self.ready);
        self.buf
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
