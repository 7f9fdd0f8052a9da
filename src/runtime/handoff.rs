//! What flows between the stages of a pipeline: the [`Handoff`] message (an activation going up,
//! or a gradient going down, with the event the receiving stream must wait on), the [`Peer`] a
//! stage hands it to, and [`MicroDone`], what the embedding tells the scheduler when a
//! micro-batch has finished.
//!
//! The pipeline is a ring: embed-head actor (embedding) → layer 0 → … → layer L-1 → embed-head
//! actor (head and loss), and gradients flow back the same way. A stage knows only its two
//! neighbours, and only as a `Peer`: a ractor `DerivedActorRef<Handoff>`, so a layer does not
//! know whether its neighbour is another layer or the embed-head actor. Growth relinks them.
//!
//! Across a device boundary an [`Activation`] is copied into the receiver's device and the
//! original is returned to the sender's device pool (see [`Activation::receive`]).

use crate::backend::pool::ActPool;
use crate::backend::Backend;
use ractor::DerivedActorRef;

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

/// A message between neighbouring stages.
pub enum Handoff<B: Backend> {
    /// An activation from below for micro-batch `mb` (at the embed-head actor: the top of the
    /// stack's output, for the head). `eval` micro-batches keep no stash.
    Forward { mb: u64, x: Activation<B>, eval: bool },
    /// The gradient of the receiver's output for micro-batch `mb` (at the embed-head actor: the
    /// gradient of the embedding's output).
    Backward { mb: u64, grad: Activation<B> },
}

/// A neighbour in the ring, whatever its actor type.
pub type Peer<B> = DerivedActorRef<Handoff<B>>;

/// Hand `h` to `peer`.
///
/// If the neighbour is gone the message is dropped: that neighbour's own failure reaches the
/// supervisor, which names it and stops or rebuilds the pipeline; failing here too would only
/// race it with a less precise error.
pub fn hand<B: Backend>(peer: &Peer<B>, h: Handoff<B>) {
    let _ = peer.send_message(h);
}

/// A micro-batch has finished: every layer has done its backward (training) or the head has
/// its loss (evaluation). Sent by the embed-head actor to the scheduler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MicroDone {
    pub mb: u64,
    /// The micro-batch's mean loss.
    pub loss: f32,
}
