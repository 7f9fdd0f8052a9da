//! `SchedulerActor`: the step clock of a run.
//!
//! It owns everything that is about *time*: the learning-rate schedule, the data cursor, the
//! micro-batches of a step and the bound on how many are in flight (1F1B memory: mailboxes are
//! unbounded, so the bound is enforced here, by issuing a new micro-batch only when one
//! finishes), gradient accumulation and the optimizer-step barrier, evaluations, checkpoints, and
//! **the growth plan**: at τ, with the pipeline drained at a step boundary, it spawns the new
//! `LayerActor`s at the bottom, moves layers whose device the placement policy changes, and
//! relinks the ring.
//!
//! It is event-driven: a handler never waits for work in flight, so status requests and stop
//! requests are answered between micro-batches. The only awaits are calls to stages at step
//! boundaries (the optimizer step, snapshots), when nothing is in flight.
//!
//! Everything it decides is a pure function of the config, the step and the data cursor, which
//! is why a run resumed from a checkpoint follows the uninterrupted run bit for bit.
//!
//! The rooms:
//! - this file: messages, state, start-up (fresh or from a checkpoint) and dispatch;
//! - [`steps`]: issuing micro-batches, ending steps and evaluations, checkpoints, the end;
//! - [`growth`]: growth at τ (and on request), layer moves, spawning and relinking stages.

pub mod agreement;
pub mod growth;
pub mod steps;

use super::embed_head::{EmbedHeadActor, EmbedHeadArgs, EmbedHeadMsg};
use super::error::{boxed, RunError};
use super::events::Observer;
use super::handoff::MicroDone;
use super::layer::{LayerInit, LayerMsg};
use super::placement;
use super::stage::LocalLayers;
use super::Roles;
use crate::backend::Backend;
use crate::checkpoint::{self, Checkpoint, GrowthRecord, UnitKey};
use crate::config::Config;
use crate::data::{sequential_batches, Dataset, Loader};
use crate::model::growth::{Expansion, GrowInit, OptStatePolicy};
use crate::model::init::InitConfig;
use crate::model::Dims;
use crate::optim::schedule::Schedule;
use crate::params::UnitState;
use crate::train::log::RunLog;
use crate::train::{dims_of, RunOptions, TrainReport};
use agreement::Agreement;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub enum SchedulerMsg {
    /// Continue the step loop (sent to itself at every boundary, and once at start).
    Next,
    /// A micro-batch (training or evaluation) finished.
    MicroDone(MicroDone),
    /// Finish the current step, write a checkpoint and end the run (SIGTERM, SIGINT).
    RequestStop,
    /// Stop at the next micro-batch boundary, dropping the step in progress, write a checkpoint
    /// of the last completed step, and end the run with [`RunError::ForcedStop`] (a second
    /// signal, or the stop grace period running out).
    ForceStop,
    Status(RpcReplyPort<Status>),
    /// Stop issuing work at the next step boundary until `Resume`.
    Pause,
    Resume,
    /// Apply the next expansion of the growth plan at the next step boundary instead of at its
    /// planned step. Answers with the new depth, or an error if no expansion is left.
    GrowNow(RpcReplyPort<Result<usize, RunError>>),
    /// Write a checkpoint at the next step boundary; answers with its path.
    CheckpointNow(RpcReplyPort<Result<PathBuf, RunError>>),
}

impl From<MicroDone> for SchedulerMsg {
    fn from(d: MicroDone) -> Self {
        SchedulerMsg::MicroDone(d)
    }
}

impl TryFrom<SchedulerMsg> for MicroDone {
    type Error = SchedulerMsg;
    fn try_from(m: SchedulerMsg) -> Result<Self, Self::Error> {
        match m {
            SchedulerMsg::MicroDone(d) => Ok(d),
            other => Err(other),
        }
    }
}

/// The end of a run, as the scheduler reports it to its supervisor.
pub struct RunEnded(pub Result<TrainReport, RunError>);

/// A snapshot of where the run is, for logs, status endpoints and supervision.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    pub run: String,
    pub step: u64,
    pub total_steps: u64,
    pub depth: usize,
    /// (layer id, device), bottom to top.
    pub stack: Vec<(u64, String)>,
    pub in_flight: usize,
    pub paused: bool,
    /// Seconds since this process started the run, and the estimated seconds left.
    pub elapsed_s: f64,
    pub eta_s: Option<f64>,
    pub placement: Vec<String>,
}

pub struct SchedulerArgs {
    pub cfg: Config,
    pub data: Arc<Dataset>,
    pub opts: RunOptions,
    /// Where the end of the run is reported (the supervisor).
    pub ended: DerivedActorRef<RunEnded>,
    /// Every actor of the pipeline is spawned linked to this supervisor.
    pub supervisor: ActorCell,
    pub roles: Roles,
    /// Published step counter (read by the supervisor when something fails).
    pub step: Arc<AtomicU64>,
    pub observer: Observer,
}

/// A layer actor of the stack (on this process, or a stand-in for one on another pipeline
/// stage: in this crate a *stage* is always a process of the pipeline, a *layer* an actor).
pub(crate) struct Layer<B: Backend> {
    id: u64,
    device: String,
    actor: ActorRef<LayerMsg<B>>,
}

/// The stack of layers, bottom first, with the growth done and still to come.
pub(crate) struct Stack<B: Backend> {
    pub layers: Vec<Layer<B>>,
    /// The next layer id to give a newborn (ids are birth order).
    pub next_id: u64,
    /// Expansions done so far (written into checkpoints).
    pub growth: Vec<GrowthRecord>,
    /// Expansions still to come.
    pub plan: Vec<Expansion>,
}

/// The micro-batches of one training step or one evaluation.
#[derive(Default)]
pub(crate) struct Pending {
    /// Micro-batch id → its index within the step (or evaluation).
    index: HashMap<u64, usize>,
    losses: Vec<f32>,
    issued: usize,
    done: usize,
}

pub(crate) enum Phase {
    Idle,
    Train(Pending),
    Eval(Pending),
    Finished,
    /// A stage died; waiting for the supervisor to stop or rebuild the pipeline.
    Stalled,
}

/// Where the run is in time: the step, the micro-batches issued, the step's start.
pub(crate) struct Clock {
    /// Optimizer steps done.
    pub step: u64,
    /// The step the run ends at.
    pub end: u64,
    /// The next micro-batch id.
    pub next_mb: u64,
    pub step_started: Instant,
    /// The loader's cursor at the start of the current step: a checkpoint of the last good
    /// state taken mid-step (a non-finite loss, a forced stop) resumes from here.
    pub step_cursor: crate::data::loader::LoaderState,
}

/// The run's checkpoints as this process knows them.
pub(crate) struct Checkpoints {
    /// This run's id (`checkpoint::Meta::run_id`): pruning deletes only its own checkpoints.
    pub run_id: String,
    /// The step of the newest checkpoint this process wrote or resumed from.
    pub last_checkpoint: Option<(u64, PathBuf)>,
    /// Checkpoint files of other runs already reported (reported once each).
    pub foreign_reported: std::collections::HashSet<PathBuf>,
    /// The checkpoint this run resumed from: never deleted by this run's pruning.
    pub resumed_from: Option<PathBuf>,
    /// Checkpoint files verified in full so far (pruning counts only those).
    pub verified: checkpoint::Verified,
}

/// The scheduler's state, in parts: the run's inputs (config, shape, schedule, data), its
/// `Clock`, its `Agreement` with the other replicas, the `Stack` of layers (with the growth
/// done and still planned), its `Checkpoints`, and its links to the other actors.
pub struct SchedulerState<B: Backend> {
    clock: Clock,
    agree: Agreement,
    ckpt: Checkpoints,
    cfg: Config,
    opts: RunOptions,
    dims: Dims,
    init_cfg: InitConfig,
    schedule: Schedule,
    loader: Loader,
    /// The training sources' names, in the loader's order (a mixture's `[[data.sources]]`).
    sources: Vec<String>,
    val: Vec<Vec<u32>>,
    embed_head: ActorRef<EmbedHeadMsg<B>>,
    stack: Stack<B>,
    phase: Phase,
    eval_pending: bool,
    /// The tokenizer of `eval.sample_tokens`'s samples, made at the first one.
    sample_tokenizer: Option<crate::data::Tokenizer>,
    /// Records, CSV files, log lines, FLOPs, early stop.
    log: RunLog,
    ended: DerivedActorRef<RunEnded>,
    supervisor: ActorCell,
    step_pub: Arc<AtomicU64>,
    observer: Observer,
    paused: bool,
    grow_now: Vec<RpcReplyPort<Result<usize, RunError>>>,
    checkpoint_now: Vec<RpcReplyPort<Result<PathBuf, RunError>>>,
    /// The layers of this process (stage 0): their arguments, one activation pool per device
    /// shared by the layers placed there (layers born later on a device join its pool), their
    /// names for the supervisor and their routes (`runtime::stage`).
    here: LocalLayers<B>,
    /// This process's place in the run (`dist::init`'s, by `RunOptions::topology`).
    topo: crate::dist::Topology,
    /// Where layers can be placed: `[placement] devices`, or with a pipeline over P processes
    /// every stage's devices (`placement::pipeline_slots`).
    slots: Vec<String>,
    ends_device: String,
    /// Links of local units to units in other processes (`remote::RemotePeerActor`), replaced
    /// at every relink.
    links: Vec<ActorRef<super::handoff::Handoff<B>>>,
}

pub struct SchedulerActor<B: Backend>(PhantomData<fn() -> B>);

impl<B: Backend> Default for SchedulerActor<B> {
    fn default() -> Self {
        SchedulerActor(PhantomData)
    }
}

type Res<T> = Result<T, ActorProcessingErr>;

/// A stage could not be reached: see [`RunError::StageGone`].
fn gone(e: impl std::fmt::Display) -> ActorProcessingErr {
    boxed(RunError::StageGone(e.to_string()))
}

/// Ask `actor` and wait for its answer (a gone actor is [`RunError::StageGone`]).
async fn ask<M: ractor::Message, T: Send + 'static>(actor: &ActorRef<M>, what: &str, build: impl FnOnce(RpcReplyPort<T>) -> M) -> Res<T> {
    match actor.call(build, None).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        Ok(ractor::rpc::CallResult::Timeout) => Err(boxed(RunError::Protocol(format!("{what}: timed out")))),
        Ok(ractor::rpc::CallResult::SenderError) | Err(_) => Err(gone(what)),
    }
}

/// The newest valid checkpoint of the run and its path, when resuming. Its config must match
/// the given one in every key that changes the trajectory (see `config::changes`), unless
/// `opts.allow_config_change` names the key, and its step must lie within `run.steps`.
fn resume_point(cfg: &Config, opts: &RunOptions) -> Res<Option<(Checkpoint, PathBuf)>> {
    if !opts.resume {
        return Ok(None);
    }
    let dir = cfg.checkpoint_dir();
    match checkpoint::load_newest_valid(&dir).map_err(|e| boxed(RunError::Checkpoint(format!("{e:#}"))))? {
        Some((ck, path, warnings)) => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            let fail = |m: String| boxed(RunError::Config(format!("cannot resume from {}: {m}", path.display())));
            let accepted = crate::config::changes::check_resume(&ck.meta.config_toml, cfg, &opts.allow_config_change)
                .map_err(|e| fail(format!("{e:#}")))?;
            if ck.meta.step > cfg.run.steps {
                return Err(fail(format!("it is at step {} but `run.steps` is {}", ck.meta.step, cfg.run.steps)));
            }
            // The newer files were skipped because they do not load: moved into `rejected/` now,
            // so that no later prune counts them or deletes a good file for them (rank 0 owns
            // the folder).
            if opts.topology.is_lead() {
                let newer = checkpoint::list(&dir).map_err(|e| boxed(RunError::Checkpoint(format!("{e:#}"))))?;
                for (_, bad) in newer.into_iter().filter(|(s, _)| *s > ck.meta.step) {
                    let to = checkpoint::reject(&bad).map_err(|e| boxed(RunError::Checkpoint(format!("{e:#}"))))?;
                    eprintln!("warning: {} does not load; moved to {}", bad.display(), to.display());
                }
            }
            if !opts.quiet {
                println!("resume from={} step={} depth={}", path.display(), ck.meta.step, ck.meta.depth);
                for c in &accepted {
                    println!("resume: config change {c}");
                }
            }
            Ok(Some((ck, path)))
        }
        None => {
            if !opts.quiet {
                println!("resume: no checkpoint in {}; starting fresh", dir.display());
            }
            Ok(None)
        }
    }
}

impl<B: Backend> Actor for SchedulerActor<B> {
    type Msg = SchedulerMsg;
    type State = SchedulerState<B>;
    type Arguments = SchedulerArgs;

    /// Build the pipeline: the embed-head actor and the initial layer actors (fresh, or restored
    /// from the newest valid checkpoint when resuming), linked under the supervisor.
    async fn pre_start(&self, me: ActorRef<SchedulerMsg>, a: SchedulerArgs) -> Res<SchedulerState<B>> {
        let cfg = a.cfg;
        let dims = dims_of(&cfg, a.data.vocab);
        let (b, t) = (cfg.data.batch_size, cfg.data.seq_len);
        let init_cfg = cfg.init_config();
        let mut loader = Loader::of(&a.data, b, t, cfg.run.seed).map_err(|e| boxed(RunError::Config(format!("{e:#}"))))?;
        let val: Vec<Vec<u32>> = sequential_batches(&a.data.val, b, t, cfg.eval.batches)
            .collect::<anyhow::Result<_>>()
            .map_err(|e| boxed(RunError::Config(format!("{e:#}"))))?;
        if val.is_empty() {
            let n = a.data.val.len();
            return Err(boxed(RunError::Config(format!(
                "the validation split has {n} tokens: too few for one batch of {b} x {} tokens",
                t + 1
            ))));
        }
        let resumed = resume_point(&cfg, &a.opts)?;
        let mut units: HashMap<String, UnitState> = HashMap::new();
        if let Some((ck, _)) = &resumed {
            for (k, u) in &ck.units {
                units.insert(k.to_string(), u.clone());
            }
            loader.restore(&ck.meta.loader);
        }
        let restore_embed_head = match &resumed {
            Some(_) => {
                let e = units.remove("embed").ok_or_else(|| boxed(RunError::Checkpoint("no embedding unit".into())))?;
                let h = units.remove("head").ok_or_else(|| boxed(RunError::Checkpoint("no head unit".into())))?;
                Some((e, h))
            }
            None => None,
        };
        let loader_cursor = loader.cursor();
        let ends_device = cfg.placement.ends.clone().unwrap_or_else(|| cfg.placement.devices[0].clone());
        let here = LocalLayers::new(&cfg, a.opts.topology, dims.clone(), a.observer.clone(), a.roles.clone());
        let args = EmbedHeadArgs {
            device: ends_device.clone(),
            dims: dims.clone(),
            init_cfg: if cfg.faults.drift_replica == Some(a.opts.topology.replica) {
                InitConfig { seed: init_cfg.seed ^ 1, ..init_cfg.clone() }
            } else {
                init_cfg.clone()
            },
            optim: cfg.optim.clone(),
            stream: crate::runtime::StreamSettings::of(&cfg),
            b,
            t,
            done: me.get_derived(),
            restore: restore_embed_head,
            observer: a.observer.clone(),
            pool: here.pool(&ends_device),
            micro_batches: cfg.data.micro_batches / a.opts.topology.replicas,
            zero: cfg.parallel.zero == 1,
            topology: a.opts.topology,
        };
        let (embed_head, _) = Actor::spawn_linked(None, EmbedHeadActor::<B>::default(), args, a.supervisor.clone())
            .await
            .map_err(|e| boxed(super::error::from_spawn(&format!("spawning the embedding and head on {ends_device}"), e)))?;
        here.name(&embed_head.get_cell(), format!("embedding and head ({ends_device})"));
        let run_id = resumed.as_ref().and_then(|(ck, _)| ck.meta.run_id.clone()).unwrap_or_else(checkpoint::new_run_id);
        let last_checkpoint = resumed.as_ref().map(|(ck, p)| (ck.meta.step, p.clone()));
        let resumed = resumed.map(|(ck, _)| ck);
        let (ids, step, next_id, growth) = match &resumed {
            Some(ck) => (ck.meta.stack.clone(), ck.meta.step, ck.meta.next_id, ck.meta.growth.clone()),
            None => ((0..cfg.model.depth as u64).collect(), 0, cfg.model.depth as u64, Vec::new()),
        };
        let slots = placement::pipeline_slots(&cfg.placement.devices, a.opts.topology.stages);
        let devices = placement::initial(cfg.placement.policy, &slots, ids.len(), cfg.target_depth());
        let end = a.opts.stop_after.map_or(cfg.run.steps, |s| s.min(cfg.run.steps));
        // The trajectory, streamed: appended to across resumes. In a data-parallel run rank 0
        // alone writes it (every rank computes the same records).
        let topo = a.opts.topology;
        let log = RunLog::new(&cfg, &dims, &a.opts, step);
        let log = if topo.replica == 0 {
            log.with_csv(&cfg.out_dir(), a.opts.resume).map_err(|e| boxed(RunError::Config(format!("{e:#}"))))?.with_progress_bar(step, end)
        } else {
            log
        };
        let mut st = SchedulerState {
            opts: a.opts.clone(),
            dims,
            init_cfg: init_cfg.clone(),
            schedule: cfg.schedule.clone(),
            // A resumed run drops the expansions its model already has (applied early by a
            // `GrowNow` before the checkpoint); for a fresh run every expansion exceeds the depth.
            loader,
            sources: a.data.sources.iter().map(|s| s.name.clone()).collect(),
            val,
            embed_head,
            stack: Stack {
                layers: Vec::new(),
                next_id,
                growth,
                plan: cfg.expansions().into_iter().filter(|e| e.to_depth > ids.len()).collect(),
            },
            clock: Clock { step, end, next_mb: 0, step_started: Instant::now(), step_cursor: loader_cursor },
            agree: Agreement::default(),
            ckpt: Checkpoints {
                run_id,
                resumed_from: last_checkpoint.as_ref().map(|(_, p)| p.clone()),
                last_checkpoint,
                foreign_reported: Default::default(),
                verified: Default::default(),
            },
            phase: Phase::Idle,
            eval_pending: step == 0,
            sample_tokenizer: None,
            log,
            ended: a.ended,
            supervisor: a.supervisor,
            step_pub: a.step,
            observer: a.observer,
            paused: false,
            grow_now: Vec::new(),
            checkpoint_now: Vec::new(),
            here,
            topo,
            slots,
            ends_device: ends_device.clone(),
            links: Vec::new(),
            cfg,
        };
        st.step_pub.store(st.clock.step, Ordering::Relaxed);
        let mut inits = Vec::with_capacity(ids.len());
        for (position, id) in ids.iter().enumerate() {
            inits.push(match units.remove(&UnitKey::Layer(*id).to_string()) {
                Some(u) => LayerInit::Restore(u),
                None if resumed.is_some() => {
                    return Err(boxed(RunError::Checkpoint(format!(
                        "the stack lists layer {id} but the checkpoint holds no tensors for it"
                    ))))
                }
                None => LayerInit::Fresh {
                    init: GrowInit::Random,
                    source: None,
                    policy: OptStatePolicy::Inherit,
                    init_cfg: init_cfg.clone(),
                    mlp: crate::model::growth::mlp_at_birth(&st.dims, position, ids.len(), init_cfg.target_depth, false),
                },
            });
        }
        // Spawned together: each layer initialises (or restores) its block on its own thread.
        let spawns = ids.iter().zip(inits).enumerate().map(|(i, (id, init))| st.spawn_layer(*id, devices[i].clone(), init));
        st.stack.layers = futures::future::try_join_all(spawns).await?;
        st.relink().await?;
        me.cast(SchedulerMsg::Next).map_err(|e| boxed(RunError::Protocol(e.to_string())))?;
        Ok(st)
    }

    async fn handle(&self, me: ActorRef<SchedulerMsg>, msg: SchedulerMsg, s: &mut SchedulerState<B>) -> Res<()> {
        match dispatch(&me, msg, s).await {
            // A stage died under us: its own failure reaches the supervisor, which names it and
            // stops or rebuilds the pipeline; wait for that.
            Err(e) if RunError::is_stage_gone(&e) => {
                s.phase = Phase::Stalled;
                Ok(())
            }
            other => other,
        }
    }
}

async fn dispatch<B: Backend>(me: &ActorRef<SchedulerMsg>, msg: SchedulerMsg, s: &mut SchedulerState<B>) -> Res<()> {
    match msg {
        SchedulerMsg::Next => {
            if matches!(s.phase, Phase::Idle) {
                s.next(me).await?;
            }
        }
        SchedulerMsg::MicroDone(d) => s.micro_done(me, d).await?,
        SchedulerMsg::RequestStop => {
            if !s.agree.stop_requested && !s.agree.stop_wanted {
                s.log.say(format!("stop requested at step {}: finishing the step, then checkpoint", s.clock.step));
            }
            if s.topo.replicas > 1 {
                // Every replica must stop after the same step: the wish travels with the next
                // step's loss reduction, and all stop once any asked (`end_step`). A paused
                // replica takes that step (the others wait for it in the reduction).
                s.agree.stop_wanted = true;
                s.paused = false;
            } else {
                s.agree.stop_requested = true;
            }
            if matches!(s.phase, Phase::Idle) {
                s.next(me).await?;
            }
        }
        SchedulerMsg::ForceStop => {
            if !s.agree.force_stop {
                s.log.say(format!("forced stop at step {}: dropping the step in progress at the next micro-batch boundary", s.clock.step));
            }
            s.agree.force_stop = true;
            if matches!(s.phase, Phase::Idle) {
                s.next(me).await?;
            }
        }
        SchedulerMsg::Status(reply) => {
            let _ = reply.send(s.status());
        }
        SchedulerMsg::Pause => {
            s.paused = true;
            (s.observer)(&super::events::Event::Paused(true));
        }
        SchedulerMsg::Resume => {
            if s.paused {
                s.paused = false;
                (s.observer)(&super::events::Event::Paused(false));
                s.again(me)?;
            }
        }
        SchedulerMsg::GrowNow(reply) => {
            s.grow_now.push(reply);
            // With replicas every one must grow at the same boundary: the wish travels with the
            // next step's reduction (`end_step`), and all grow at the boundary after it.
            s.agree.grow_wanted = s.topo.replicas > 1;
            if matches!(s.phase, Phase::Idle) {
                s.next(me).await?;
            }
        }
        SchedulerMsg::CheckpointNow(reply) => {
            s.checkpoint_now.push(reply);
            if matches!(s.phase, Phase::Idle) {
                s.next(me).await?;
            }
        }
    }
    Ok(())
}
