//! `EmbedHeadActor`: both ends of the pipeline ring in one actor — the token and position
//! embedding (the first stage) and the final LayerNorm + tied LM head + loss (the last stage).
//!
//! Why one actor: the LM head is tied to the token embedding, and the tie must be exact (`wte`
//! receives the sum of both gradients). With both ends here there is one copy of `wte`, no
//! gradient exchange, and the token ids and targets of a micro-batch live where both the
//! embedding and the loss need them (see the `model` module docs).
//!
//! A training micro-batch: `Micro` (ids uploaded, embedding forward, `Handoff::Forward` to the
//! first layer) → … → `Handoff::Forward` arriving here from the top layer (head: loss and its
//! gradient, `Handoff::Backward` to the top layer) → … → `Handoff::Backward` arriving here from
//! the first layer (embedding gradient; [`MicroDone`] with the loss to the scheduler). An
//! evaluation micro-batch (`EvalMicro`) reports `MicroDone` at the head. With no layers at all
//! (a 0-layer model) this actor hands the activation to itself.
//!
//! It knows the scheduler only as a `DerivedActorRef<MicroDone>`, and the layers only as
//! [`Peer`]s.

use super::error::RunError;
use super::events::Observer;
use super::handoff::{hand, Activation, Handoff, MicroDone, Peer};
use super::{compute, compute_on};
use crate::backend::pool::ActPool;
use crate::backend::Backend;
use crate::model::init::InitConfig;
use crate::model::{Batch, Dims, Embed, Head};
use crate::optim::{step_units, OptimConfig, Optimizer, Scratch};
use crate::params::UnitState;
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};
use std::collections::HashMap;
use std::marker::PhantomData;

pub enum EmbedHeadMsg<B: Backend> {
    /// Start a training micro-batch: `windows` are B rows of T+1 tokens; the loss gradient is
    /// scaled by `dscale` (1 / (B·T·micro_batches): a mean over the step).
    Micro {
        mb: u64,
        windows: Vec<u32>,
        dscale: f32,
    },
    /// Start an evaluation micro-batch (forward only).
    EvalMicro {
        mb: u64,
        windows: Vec<u32>,
    },
    /// From a neighbour: the top of the stack's output (for the head), or the gradient of the
    /// embedding's output (for the embedding).
    Handoff(Handoff<B>),
    /// As `LayerMsg::Step`: answers with the gradient sum of squares of both ends.
    Step {
        lr: f32,
        step: u64,
        reply: RpcReplyPort<f64>,
    },
    /// Snapshots of (embedding, head).
    GetState(RpcReplyPort<(UnitState, UnitState)>),
    SetState {
        embed: UnitState,
        head: UnitState,
        reply: RpcReplyPort<Result<(), RunError>>,
    },
    /// The bottom and top layers of the stack (None, None for a 0-layer model).
    Link {
        first: Option<Peer<B>>,
        last: Option<Peer<B>>,
    },
    ResetOptState(RpcReplyPort<()>),
}

impl<B: Backend> From<Handoff<B>> for EmbedHeadMsg<B> {
    fn from(h: Handoff<B>) -> Self {
        EmbedHeadMsg::Handoff(h)
    }
}

impl<B: Backend> TryFrom<EmbedHeadMsg<B>> for Handoff<B> {
    type Error = EmbedHeadMsg<B>;
    fn try_from(m: EmbedHeadMsg<B>) -> Result<Self, Self::Error> {
        match m {
            EmbedHeadMsg::Handoff(h) => Ok(h),
            other => Err(other),
        }
    }
}

pub struct EmbedHeadArgs<B: Backend> {
    pub device: String,
    pub dims: Dims,
    pub init_cfg: InitConfig,
    pub optim: OptimConfig,
    /// The precision of the stream's products and its attention algorithm.
    pub stream: crate::runtime::StreamSettings,
    pub b: usize,
    pub t: usize,
    /// Where finished micro-batches are reported (the scheduler).
    pub done: DerivedActorRef<MicroDone>,
    /// Restore from these snapshots instead of initialising.
    pub restore: Option<(UnitState, UnitState)>,
    pub observer: Observer,
    /// The buffer pool shared by the stages on this device.
    pub pool: ActPool<B>,
    /// Backwards per step on this replica (`data.micro_batches / parallel.data`).
    pub micro_batches: usize,
    /// ZeRO-1: shard the optimizer state over the replicas (`parallel.zero = 1`).
    pub zero: bool,
    /// This process's place in the run (replicas, stages).
    pub topology: crate::dist::Topology,
}

enum Kind {
    Train { dscale: f32, loss: f32 },
    Eval,
}

struct InFlight<B: Backend> {
    batch: Batch<B>,
    kind: Kind,
}

pub struct EmbedHeadState<B: Backend> {
    sync: crate::runtime::grad_sync::GradSync,
    be: B,
    pool: ActPool<B>,
    embed: Embed<B>,
    head: Head<B>,
    opt: Optimizer,
    scratch: Scratch<B>,
    b: usize,
    t: usize,
    live: HashMap<u64, InFlight<B>>,
    spare: Vec<Batch<B>>,
    tmp: (Vec<u32>, Vec<u32>),
    first: Option<Peer<B>>,
    last: Option<Peer<B>>,
    done: DerivedActorRef<MicroDone>,
    _observer: Observer,
}

pub struct EmbedHeadActor<B: Backend>(PhantomData<fn() -> B>);

impl<B: Backend> Default for EmbedHeadActor<B> {
    fn default() -> Self {
        EmbedHeadActor(PhantomData)
    }
}

fn gone(e: impl std::fmt::Display) -> RunError {
    RunError::StageGone(e.to_string())
}

impl<B: Backend> EmbedHeadState<B> {
    /// Embedding forward of a new micro-batch, handed to the first layer.
    fn start(&mut self, me: &ActorRef<EmbedHeadMsg<B>>, mb: u64, windows: &[u32], kind: Kind) -> Result<(), RunError> {
        let (b, t) = (self.b, self.t);
        let eval = matches!(kind, Kind::Eval);
        let x = compute_on(&self.be, || {
            let mut batch = self.spare.pop().unwrap_or_else(|| Batch::from_windows(&self.be, windows, b, t));
            batch.load(&self.be, windows, &mut self.tmp.0, &mut self.tmp.1);
            let x = self.embed.forward(&self.be, &batch.inputs, b, t);
            self.live.insert(mb, InFlight { batch, kind });
            Activation::send(&self.be, x, b, t, &self.pool)
        });
        let h = Handoff::Forward { mb, x, eval };
        match &self.first {
            Some(p) => hand(p, h),
            // 0 layers: the embedding output goes straight to the head (through the mailbox, so
            // the order of work is the same as with layers).
            None => me.cast(EmbedHeadMsg::Handoff(h)).map_err(gone)?,
        }
        Ok(())
    }

    /// Head: the loss (evaluation: reported now) and its gradient, handed to the top layer.
    fn head(&mut self, me: &ActorRef<EmbedHeadMsg<B>>, mb: u64, x: Activation<B>) -> Result<(), RunError> {
        let (b, t) = (self.b, self.t);
        let f = self.live.get_mut(&mb).ok_or_else(|| RunError::Protocol(format!("head: unknown micro-batch {mb}")))?;
        match &mut f.kind {
            Kind::Eval => {
                let loss = compute_on(&self.be, || {
                    let x = x.receive(&self.be, &self.pool);
                    let (x, loss) = self.head.loss_only(&self.be, x, &f.batch.targets, &self.embed.w, b, t);
                    self.embed.recycle(&self.be, x);
                    loss
                });
                let done = self.live.remove(&mb).expect("present above");
                self.spare.push(done.batch);
                self.done.send_message(MicroDone { mb, loss }).map_err(gone)
            }
            Kind::Train { dscale, loss } => {
                let dscale = *dscale;
                let dx = compute_on(&self.be, || {
                    let x = x.receive(&self.be, &self.pool);
                    let (dx, l) = self.head.forward_backward(&self.be, mb, x, &f.batch.targets, &self.embed.w, dscale, b, t);
                    *loss = l;
                    Activation::send(&self.be, dx, b, t, &self.pool)
                });
                let h = Handoff::Backward { mb, grad: dx };
                match &self.last {
                    Some(p) => hand(p, h),
                    None => me.cast(EmbedHeadMsg::Handoff(h)).map_err(gone)?,
                }
                Ok(())
            }
        }
    }

    /// Embedding backward: the micro-batch is done everywhere.
    fn embed_backward(&mut self, mb: u64, grad: Activation<B>) -> Result<(), RunError> {
        let (b, t) = (self.b, self.t);
        let f = self.live.remove(&mb).ok_or_else(|| RunError::Protocol(format!("embedding: unknown micro-batch {mb}")))?;
        compute_on(&self.be, || {
            let dx = grad.receive(&self.be, &self.pool);
            self.embed.backward(&self.be, dx, &f.batch.inputs, b, t);
            // The step's last backward: every layer has started its reduction; start the
            // embedding's (with the tied head's share folded in) and the head's.
            if self.sync.backward_done() {
                self.head.flush_tied_grad(&self.be, &self.embed.w);
                self.sync.start(&self.be, &self.embed.w);
                self.sync.start(&self.be, &self.head.w);
            }
        });
        self.spare.push(f.batch);
        let loss = match f.kind {
            Kind::Train { loss, .. } => loss,
            Kind::Eval => return Err(RunError::Protocol(format!("embedding: backward for evaluation micro-batch {mb}"))),
        };
        self.done.send_message(MicroDone { mb, loss }).map_err(gone)
    }
}

impl<B: Backend> Actor for EmbedHeadActor<B> {
    type Msg = EmbedHeadMsg<B>;
    type State = EmbedHeadState<B>;
    type Arguments = EmbedHeadArgs<B>;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, a: EmbedHeadArgs<B>) -> Result<Self::State, ActorProcessingErr> {
        let be =
            crate::runtime::open_stream::<B>(&a.device, a.stream).map_err(|e| RunError::Device(format!("embedding and head: {e:#}")))?;
        let (mut embed, mut head) = compute(|| (Embed::new(&be, &a.dims, &a.init_cfg), Head::new(&be, &a.dims, &a.init_cfg)));
        embed.use_pool(a.pool.clone());
        head.use_pool(a.pool.clone());
        if let Some((e, h)) = &a.restore {
            compute(|| -> anyhow::Result<()> {
                embed.w.restore(&be, e)?;
                head.w.restore(&be, h)
            })
            .map_err(|e| RunError::Checkpoint(format!("embedding and head: restoring: {e:#}")))?;
        }
        let sync = crate::runtime::grad_sync::GradSync::new(a.micro_batches, a.zero, a.topology);
        compute(|| {
            sync.shard(&be, &mut embed.w, u64::MAX);
            sync.shard(&be, &mut head.w, u64::MAX - 1);
        });
        Ok(EmbedHeadState {
            sync,
            be,
            pool: a.pool,
            embed,
            head,
            opt: Optimizer::new(a.optim),
            scratch: Scratch::default(),
            b: a.b,
            t: a.t,
            live: HashMap::new(),
            spare: Vec::new(),
            tmp: (Vec::new(), Vec::new()),
            first: None,
            last: None,
            done: a.done,
            _observer: a.observer,
        })
    }

    async fn handle(&self, me: ActorRef<Self::Msg>, msg: Self::Msg, s: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            EmbedHeadMsg::Micro { mb, windows, dscale } => s.start(&me, mb, &windows, Kind::Train { dscale, loss: f32::NAN })?,
            EmbedHeadMsg::EvalMicro { mb, windows } => s.start(&me, mb, &windows, Kind::Eval)?,
            EmbedHeadMsg::Handoff(Handoff::Forward { mb, x, .. }) => s.head(&me, mb, x)?,
            EmbedHeadMsg::Handoff(Handoff::Backward { mb, grad }) => s.embed_backward(mb, grad)?,
            EmbedHeadMsg::Step { lr, step: _, reply } => {
                let ss = compute(|| {
                    s.head.flush_tied_grad(&s.be, &s.embed.w);
                    let units = &mut [&mut s.embed.w, &mut s.head.w];
                    let ss = step_units(&s.be, &s.opt, &mut s.scratch, &mut s.sync, units, lr, true);
                    s.be.synchronize();
                    ss
                });
                let _ = reply.send(ss);
            }
            EmbedHeadMsg::GetState(reply) => {
                let st = compute(|| (s.sync.snapshot(&s.be, &s.embed.w), s.sync.snapshot(&s.be, &s.head.w)));
                let _ = reply.send(st);
            }
            EmbedHeadMsg::SetState { embed, head, reply } => {
                let r = compute(|| -> anyhow::Result<()> {
                    s.embed.w.restore(&s.be, &embed)?;
                    s.head.w.restore(&s.be, &head)
                });
                let _ = reply.send(r.map_err(|e| RunError::Checkpoint(format!("embedding and head: {e:#}"))));
            }
            EmbedHeadMsg::Link { first, last } => {
                s.first = first;
                s.last = last;
            }
            EmbedHeadMsg::ResetOptState(reply) => {
                compute(|| {
                    s.embed.w.state.reset(&s.be);
                    s.head.w.state.reset(&s.be);
                });
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}
