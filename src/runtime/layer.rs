//! `LayerActor`: one transformer block as an actor, pinned to a stream of its device.
//!
//! It owns the block's parameters, gradients and optimizer state (its own step counters), the
//! per-micro-batch activation stash (inside [`Block`]), and one backend stream. It knows its two
//! neighbours as [`Peer`]s — whether each is another layer or the embed-head actor it does not
//! know: activations arrive from below and go up, gradients arrive from above and go down.
//! Growth spawns new `LayerActor`s at the bottom of the live pipeline and relinks the ring;
//! nothing else changes for the existing layers.
//!
//! Messages (`LayerMsg`): `Handoff` (forward or backward: what neighbours send through a `Peer`),
//! `Step`, `GetState` / `SetState`, `Link`, `ResetOptState`, `InFlight`. Stopping is ractor's
//! `stop`.

use super::error::RunError;
use super::events::{Event, Observer};
use super::handoff::{hand, Activation, Handoff, Peer};
use super::{compute, compute_on};
use crate::backend::pool::ActPool;
use crate::backend::Backend;
use crate::model::growth::{make_block, GrowInit, OptStatePolicy, Plan};
use crate::model::init::InitConfig;
use crate::model::{Block, Dims};
use crate::optim::{step_units, OptimConfig, Optimizer, Scratch};
use crate::params::UnitState;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::marker::PhantomData;

pub enum LayerMsg<B: Backend> {
    /// From a neighbour: an activation from below, or the gradient of this layer's output.
    Handoff(Handoff<B>),
    /// Apply the optimizer with learning rate `lr` (step index `step`), zero the gradients.
    /// Answers with the sum of squares of the gradients it applied (for the gradient norm).
    Step {
        lr: f32,
        step: u64,
        reply: RpcReplyPort<f64>,
    },
    /// A host snapshot of parameters and optimizer state (copying init, checkpoints, moves).
    GetState(RpcReplyPort<UnitState>),
    SetState(UnitState, RpcReplyPort<Result<(), RunError>>),
    /// New neighbours (after growth or a move).
    Link {
        prev: Peer<B>,
        next: Peer<B>,
    },
    /// Zero the optimizer state (the `reset` growth policy).
    ResetOptState(RpcReplyPort<()>),
    /// Micro-batches stashed here right now (the in-flight bound is checked with this).
    InFlight(RpcReplyPort<usize>),
}

impl<B: Backend> From<Handoff<B>> for LayerMsg<B> {
    fn from(h: Handoff<B>) -> Self {
        LayerMsg::Handoff(h)
    }
}

impl<B: Backend> TryFrom<LayerMsg<B>> for Handoff<B> {
    type Error = LayerMsg<B>;
    fn try_from(m: LayerMsg<B>) -> Result<Self, Self::Error> {
        match m {
            LayerMsg::Handoff(h) => Ok(h),
            other => Err(other),
        }
    }
}

/// How a layer's block comes to be (serialisable: a remote stage is told it in a frame).
#[derive(serde::Serialize, serde::Deserialize)]
pub enum LayerInit {
    /// Born at τ (or at step 0) per the growth operator.
    /// `mlp`: dense or mixture of experts (`model::growth::mlp_at_birth`; a copy takes its
    /// source's).
    Fresh { init: GrowInit, source: Option<UnitState>, policy: OptStatePolicy, init_cfg: InitConfig, mlp: crate::model::moe::Mlp },
    /// Newborn `j` of a growth plan (`model::growth::Plan::make`), from its source's snapshot.
    Born { plan: Box<Plan>, j: usize, source: Option<UnitState> },
    /// Restored from a checkpoint or moved from another device.
    Restore(UnitState),
}

pub struct LayerArgs<B: Backend> {
    pub id: u64,
    pub device: String,
    pub dims: Dims,
    pub init: LayerInit,
    pub optim: OptimConfig,
    /// The precision of the stream's products and its attention algorithm.
    pub stream: crate::runtime::StreamSettings,
    /// Fault injection: panic when taking the optimizer step with this index.
    pub panic_at_step: Option<u64>,
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

pub struct LayerState<B: Backend> {
    sync: crate::runtime::grad_sync::GradSync,
    be: B,
    pool: ActPool<B>,
    block: Block<B>,
    opt: Optimizer,
    scratch: Scratch<B>,
    prev: Option<Peer<B>>,
    next: Option<Peer<B>>,
    panic_at_step: Option<u64>,
    observer: Observer,
    device: String,
}

/// The actor type; generic over the backend of its stream.
pub struct LayerActor<B: Backend>(PhantomData<fn() -> B>);

impl<B: Backend> Default for LayerActor<B> {
    fn default() -> Self {
        LayerActor(PhantomData)
    }
}

impl<B: Backend> LayerState<B> {
    /// y = block(x), handed up.
    fn forward(&mut self, mb: u64, x: Activation<B>, eval: bool) -> Result<(), RunError> {
        let t0 = std::time::Instant::now();
        let y = compute_on(&self.be, || {
            let (b, t) = (x.b, x.t);
            let x = x.receive(&self.be, &self.pool);
            let y = self.block.forward(&self.be, mb, x, b, t);
            if eval {
                self.block.forget(&self.be, mb);
            }
            Activation::send(&self.be, y, b, t, &self.pool)
        });
        let seconds = t0.elapsed().as_secs_f64();
        (self.observer)(&Event::LayerTime { layer: self.block.id, device: self.device.clone(), backward: false, seconds });
        let next = self.next.as_ref().ok_or_else(|| RunError::Protocol(format!("layer {} has no downstream link", self.block.id)))?;
        hand(next, Handoff::Forward { mb, x: y, eval });
        Ok(())
    }

    /// dx = block'(dy), handed down; the block's parameter gradients accumulate.
    fn backward(&mut self, mb: u64, grad: Activation<B>) -> Result<(), RunError> {
        let t0 = std::time::Instant::now();
        let dx = compute_on(&self.be, || {
            let (b, t) = (grad.b, grad.t);
            let dy = grad.receive(&self.be, &self.pool);
            let dx = self.block.backward(&self.be, mb, dy);
            let dx = Activation::send(&self.be, dx, b, t, &self.pool);
            // The step's last backward here: start summing the gradients over the replicas
            // before handing dx down, so the lower layers' requests come after this one.
            if self.sync.backward_done() {
                self.sync.start(&self.be, &self.block.w);
            }
            dx
        });
        let seconds = t0.elapsed().as_secs_f64();
        (self.observer)(&Event::LayerTime { layer: self.block.id, device: self.device.clone(), backward: true, seconds });
        let prev = self.prev.as_ref().ok_or_else(|| RunError::Protocol(format!("layer {} has no upstream link", self.block.id)))?;
        hand(prev, Handoff::Backward { mb, grad: dx });
        Ok(())
    }
}

impl<B: Backend> Actor for LayerActor<B> {
    type Msg = LayerMsg<B>;
    type State = LayerState<B>;
    type Arguments = LayerArgs<B>;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, a: LayerArgs<B>) -> Result<Self::State, ActorProcessingErr> {
        // Opening the stream and building the block (host-side init of up to millions of
        // parameters, or a restore) run on a blocking thread that this future awaits: when
        // growth spawns k layers together, their inits run in parallel instead of one by one.
        let (id, device, dims, init, settings) = (a.id, a.device.clone(), a.dims.clone(), a.init, a.stream);
        let built = tokio::task::spawn_blocking(move || -> anyhow::Result<(B, Block<B>)> {
            let be = crate::runtime::open_stream::<B>(&device, settings)?;
            let block = match init {
                LayerInit::Fresh { init, source, policy, init_cfg, mlp } => {
                    make_block(&be, &dims, id, init, source.as_ref(), policy, &init_cfg, mlp)?
                }
                LayerInit::Born { plan, j, source } => plan.make(&be, &dims, j, source.as_ref())?,
                LayerInit::Restore(state) => {
                    let mlp = Block::<B>::mlp_of_len(&dims, state.params.len()).ok_or_else(|| {
                        anyhow::anyhow!("layer {id}: its state holds {} parameters, which no block of this model has", state.params.len())
                    })?;
                    let mut blk = Block::new_empty_mlp(&be, &dims, id, mlp);
                    blk.w.restore(&be, &state)?;
                    blk
                }
            };
            Ok((be, block))
        })
        .await
        .map_err(|e| RunError::Device(format!("layer {}: initialisation thread failed: {e}", a.id)))?;
        let (be, mut block) = built.map_err(|e| RunError::Device(format!("layer {}: {e:#}", a.id)))?;
        block.use_pool(a.pool.clone());
        let sync = crate::runtime::grad_sync::GradSync::new(a.micro_batches, a.zero, a.topology);
        sync.shard(&be, &mut block.w, a.id);
        Ok(LayerState {
            sync,
            be,
            pool: a.pool,
            block,
            opt: Optimizer::new(a.optim),
            scratch: Scratch::default(),
            prev: None,
            next: None,
            panic_at_step: a.panic_at_step,
            observer: a.observer,
            device: a.device,
        })
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: Self::Msg, s: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            LayerMsg::Handoff(Handoff::Forward { mb, x, eval }) => s.forward(mb, x, eval)?,
            LayerMsg::Handoff(Handoff::Backward { mb, grad }) => s.backward(mb, grad)?,
            LayerMsg::Step { lr, step, reply } => {
                if s.panic_at_step == Some(step) {
                    panic!("injected fault: layer {} fails at step {step}", s.block.id);
                }
                let ss = compute(|| {
                    let ss = step_units(&s.be, &s.opt, &mut s.scratch, &mut s.sync, &mut [&mut s.block.w], lr, true);
                    let load = s.block.after_update(&s.be);
                    s.be.synchronize();
                    if let Some(load) = load {
                        (s.observer)(&Event::ExpertLoad { layer: s.block.id, step, load });
                    }
                    ss
                });
                let _ = reply.send(ss);
            }
            LayerMsg::GetState(reply) => {
                let st = compute(|| s.sync.snapshot(&s.be, &s.block.w));
                let _ = reply.send(st);
            }
            LayerMsg::SetState(st, reply) => {
                let r = compute(|| s.block.w.restore(&s.be, &st)).map_err(|e| RunError::Checkpoint(format!("layer {}: {e:#}", s.block.id)));
                let _ = reply.send(r);
            }
            LayerMsg::Link { prev, next } => {
                s.prev = Some(prev);
                s.next = Some(next);
            }
            LayerMsg::ResetOptState(reply) => {
                compute(|| s.block.w.state.reset(&s.be));
                let _ = reply.send(());
            }
            LayerMsg::InFlight(reply) => {
                let _ = reply.send(s.block.in_flight());
            }
        }
        Ok(())
    }
}
