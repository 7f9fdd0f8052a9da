//! `EndsActor`: both ends of the pipeline ring in one actor — the embedding (first stage) and the
//! final LayerNorm + tied LM head + loss (last stage).
//!
//! Why one actor: the LM head is tied to the token embedding, and the tie must be exact (`wte`
//! receives the sum of both gradients). With both ends here there is one copy of `wte`, no
//! gradient exchange, and the token ids and targets of a micro-batch live where both the
//! embedding and the loss need them (see the `model` module docs).
//!
//! A training micro-batch: `Micro` (ids uploaded, embedding forward, hand to layer 0) →
//! … → `HeadForward` (loss and its gradient, hand the gradient to the top layer) → … →
//! `EmbedBackward` (embedding gradient; report `MicroDone` with the loss to the scheduler). With
//! no layers at all (a 0-layer model) the ends hand the activation to themselves.

use super::events::Observer;
use super::layer::LayerMsg;
use super::messages::{compute, Activation, Peer};
use super::scheduler::SchedMsg;
use crate::backend::Backend;
use crate::model::init::InitConfig;
use crate::model::{ActPool, Batch, Dims, Embed, Head, UnitState};
use crate::optim::{OptimConfig, Optimizer, Scratch};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::HashMap;
use std::marker::PhantomData;

pub enum EndsMsg<B: Backend> {
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
    /// The top of the stack's output for micro-batch `mb`, arriving at the head.
    HeadForward {
        mb: u64,
        x: Activation<B>,
    },
    /// The gradient of the embedding output, arriving back at the embedding.
    EmbedBackward {
        mb: u64,
        grad: Activation<B>,
    },
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
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// The bottom and top layers of the stack (None, None for a 0-layer model).
    Link {
        first: Option<ActorRef<LayerMsg<B>>>,
        last: Option<ActorRef<LayerMsg<B>>>,
    },
    ResetOptState(RpcReplyPort<()>),
}

pub struct EndsArgs<B: Backend> {
    pub device: String,
    pub dims: Dims,
    pub init_cfg: InitConfig,
    pub optim: OptimConfig,
    pub b: usize,
    pub t: usize,
    pub scheduler: ActorRef<SchedMsg>,
    /// Restore from these snapshots instead of initialising.
    pub restore: Option<(UnitState, UnitState)>,
    pub observer: Observer,
    /// The buffer pool shared by the stages on this device.
    pub pool: ActPool<B>,
}

enum Kind {
    Train { dscale: f32, loss: f32 },
    Eval,
}

struct InFlight<B: Backend> {
    batch: Batch<B>,
    kind: Kind,
}

pub struct EndsState<B: Backend> {
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
    scheduler: ActorRef<SchedMsg>,
    _observer: Observer,
}

pub struct EndsActor<B: Backend>(PhantomData<fn() -> B>);

impl<B: Backend> Default for EndsActor<B> {
    fn default() -> Self {
        EndsActor(PhantomData)
    }
}

impl<B: Backend> EndsState<B> {
    fn start(&mut self, me: &ActorRef<EndsMsg<B>>, mb: u64, windows: &[u32], kind: Kind) -> anyhow::Result<()> {
        let (b, t) = (self.b, self.t);
        let x = compute(|| {
            let mut batch = self.spare.pop().unwrap_or_else(|| Batch::from_windows(&self.be, windows, b, t));
            batch.load(&self.be, windows, &mut self.tmp.0, &mut self.tmp.1);
            let x = self.embed.forward(&self.be, &batch.inputs, b, t);
            self.live.insert(mb, InFlight { batch, kind });
            Activation::send(&self.be, x, b, t, &self.pool)
        });
        match &self.first {
            Some(p) => p.forward(mb, x, matches!(self.live[&mb].kind, Kind::Eval)),
            // 0 layers: the embedding output goes straight to the head (through the mailbox, so
            // the order of work is the same as with layers).
            None => me.cast(EndsMsg::HeadForward { mb, x }).map_err(|e| anyhow::anyhow!("{e}")),
        }
    }

    fn head_forward(&mut self, me: &ActorRef<EndsMsg<B>>, mb: u64, x: Activation<B>) -> anyhow::Result<()> {
        let (b, t) = (self.b, self.t);
        let f = self.live.get_mut(&mb).ok_or_else(|| anyhow::anyhow!("head: unknown micro-batch {mb}"))?;
        match &mut f.kind {
            Kind::Eval => {
                let loss = compute(|| {
                    let x = x.receive(&self.be, &self.pool);
                    let (x, loss) = self.head.loss_only(&self.be, x, &f.batch.targets, &self.embed.w, b, t);
                    self.embed.recycle(&self.be, x);
                    loss
                });
                let done = self.live.remove(&mb).expect("present above");
                self.spare.push(done.batch);
                self.scheduler.cast(SchedMsg::EvalDone { mb, loss }).map_err(|e| anyhow::anyhow!("{e}"))
            }
            Kind::Train { dscale, loss } => {
                let dscale = *dscale;
                let dx = compute(|| {
                    let x = x.receive(&self.be, &self.pool);
                    let (dx, l) = self.head.forward_backward(&self.be, mb, x, &f.batch.targets, &self.embed.w, dscale, b, t);
                    *loss = l;
                    Activation::send(&self.be, dx, b, t, &self.pool)
                });
                match &self.last {
                    Some(p) => p.backward(mb, dx),
                    None => me.cast(EndsMsg::EmbedBackward { mb, grad: dx }).map_err(|e| anyhow::anyhow!("{e}")),
                }
            }
        }
    }

    fn embed_backward(&mut self, mb: u64, grad: Activation<B>) -> anyhow::Result<()> {
        let (b, t) = (self.b, self.t);
        let f = self.live.remove(&mb).ok_or_else(|| anyhow::anyhow!("embedding: unknown micro-batch {mb}"))?;
        compute(|| {
            let dx = grad.receive(&self.be, &self.pool);
            self.embed.backward(&self.be, dx, &f.batch.inputs, b, t);
        });
        self.spare.push(f.batch);
        let loss = match f.kind {
            Kind::Train { loss, .. } => loss,
            Kind::Eval => anyhow::bail!("embedding: backward for evaluation micro-batch {mb}"),
        };
        self.scheduler.cast(SchedMsg::MicroDone { mb, loss }).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

impl<B: Backend> Actor for EndsActor<B> {
    type Msg = EndsMsg<B>;
    type State = EndsState<B>;
    type Arguments = EndsArgs<B>;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, a: EndsArgs<B>) -> Result<Self::State, ActorProcessingErr> {
        let be = B::open(&a.device).map_err(|e| format!("ends: {e:#}"))?;
        let (mut embed, mut head) = compute(|| (Embed::new(&be, &a.dims, &a.init_cfg), Head::new(&be, &a.dims)));
        embed.use_pool(a.pool.clone());
        head.use_pool(a.pool.clone());
        if let Some((e, h)) = &a.restore {
            compute(|| -> anyhow::Result<()> {
                embed.w.restore(&be, e)?;
                head.w.restore(&be, h)
            })
            .map_err(|e| format!("ends: restoring from checkpoint: {e:#}"))?;
        }
        Ok(EndsState {
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
            scheduler: a.scheduler,
            _observer: a.observer,
        })
    }

    async fn handle(&self, me: ActorRef<Self::Msg>, msg: Self::Msg, s: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            EndsMsg::Micro { mb, windows, dscale } => s.start(&me, mb, &windows, Kind::Train { dscale, loss: f32::NAN })?,
            EndsMsg::EvalMicro { mb, windows } => s.start(&me, mb, &windows, Kind::Eval)?,
            EndsMsg::HeadForward { mb, x } => s.head_forward(&me, mb, x)?,
            EndsMsg::EmbedBackward { mb, grad } => s.embed_backward(mb, grad)?,
            EndsMsg::Step { lr, step: _, reply } => {
                let ss = compute(|| {
                    s.head.flush_tied_grad(&s.be, &s.embed.w);
                    let ss = s.embed.w.grad_sumsq(&s.be, &mut s.scratch) + s.head.w.grad_sumsq(&s.be, &mut s.scratch);
                    s.opt.step(&s.be, &mut s.embed.w, &mut s.scratch, lr);
                    s.opt.step(&s.be, &mut s.head.w, &mut s.scratch, lr);
                    s.embed.w.zero_grad(&s.be);
                    s.head.w.zero_grad(&s.be);
                    s.be.synchronize();
                    ss
                });
                let _ = reply.send(ss);
            }
            EndsMsg::GetState(reply) => {
                let st = compute(|| (s.embed.w.snapshot(&s.be), s.head.w.snapshot(&s.be)));
                let _ = reply.send(st);
            }
            EndsMsg::SetState { embed, head, reply } => {
                let r = compute(|| -> anyhow::Result<()> {
                    s.embed.w.restore(&s.be, &embed)?;
                    s.head.w.restore(&s.be, &head)
                });
                let _ = reply.send(r.map_err(|e| format!("ends: {e:#}")));
            }
            EndsMsg::Link { first, last } => {
                s.first = first.map(Peer::Layer);
                s.last = last.map(Peer::Layer);
            }
            EndsMsg::ResetOptState(reply) => {
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
