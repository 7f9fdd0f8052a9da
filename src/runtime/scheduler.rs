//! `SchedulerActor`: the step clock of a run.
//!
//! It owns everything that is about *time*: the learning-rate schedule, the data cursor, the
//! micro-batches of a step and the bound on how many are in flight (1F1B memory: mailboxes are
//! unbounded, so the bound is enforced here, by issuing a new micro-batch only when one
//! finishes), gradient accumulation and the optimizer-step barrier, evaluations, checkpoints, and
//! **the growth plan**: at τ, with the pipeline drained at a step boundary, it spawns the new
//! `LayerActor`s at the bottom (reading trained state from their sources with `GetState` for
//! `copying`), moves layers whose device the placement policy changes, and relinks the ring.
//!
//! It is event-driven: a handler never waits for work in flight, so status requests and stop
//! requests are answered between micro-batches. The only awaits are calls to stages at step
//! boundaries (the optimizer step, snapshots), when nothing is in flight.
//!
//! Everything it decides is a pure function of the config, the step and the data cursor, which
//! is why a run resumed from a checkpoint follows the uninterrupted run bit for bit.

use super::ends::{EndsActor, EndsArgs, EndsMsg};
use super::events::{Event, Observer};
use super::layer::{LayerActor, LayerArgs, LayerInit, LayerMsg};
use super::messages::Peer;
use super::placement;
use super::trainer::{Roles, TrainerMsg};
use crate::backend::Backend;
use crate::checkpoint::{self, Checkpoint, GrowthRecord, Meta, UnitKey};
use crate::config::Config;
use crate::data::{sequential_batches, Dataset, Loader};
use crate::flops;
use crate::model::growth::{plan_sources, Expansion, OptStatePolicy, Position};
use crate::model::init::InitConfig;
use crate::model::{ActPool, Dims, UnitState};
use crate::optim::schedule::Schedule;
use crate::train::{dims_of, eval_due, EvalRecord, StepRecord, TrainReport};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::HashMap;
use std::io::Write;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub enum SchedMsg {
    /// Continue the step loop (sent to itself at every boundary, and once at start).
    Next,
    /// A training micro-batch finished its backward everywhere; `loss` is its mean loss.
    MicroDone {
        mb: u64,
        loss: f32,
    },
    /// An evaluation micro-batch finished; `loss` is its mean loss.
    EvalDone {
        mb: u64,
        loss: f32,
    },
    /// Finish the current step, write a checkpoint and end the run (SIGTERM, SIGINT).
    RequestStop,
    Status(RpcReplyPort<Status>),
    /// Stop issuing work at the next step boundary until `Resume`.
    Pause,
    Resume,
    /// Apply the next expansion of the growth plan at the next step boundary instead of at its
    /// planned step. Answers with the new depth, or an error if no expansion is left.
    GrowNow(RpcReplyPort<Result<usize, String>>),
    /// Write a checkpoint at the next step boundary; answers with its path.
    CheckpointNow(RpcReplyPort<Result<String, String>>),
}

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

/// Knobs that are not part of the experiment.
#[derive(Clone, Debug, Default)]
pub struct SchedOptions {
    pub quiet: bool,
    pub stop_after: Option<u64>,
    pub stop_below_val: Option<f32>,
    /// Start from the newest valid checkpoint of the run (fresh if there is none).
    pub resume: bool,
    /// Disarm the `[faults]` of the config (the trainer does so after a restart, so that an
    /// injected fault fires once).
    pub faults_disarmed: bool,
}

pub struct SchedArgs {
    pub cfg: Config,
    pub data: Arc<Dataset>,
    pub opts: SchedOptions,
    pub trainer: ActorRef<TrainerMsg>,
    /// Every stage actor is spawned linked to this supervisor (the trainer).
    pub supervisor: ActorCell,
    pub roles: Roles,
    /// Published step counter (read by the supervisor when something fails).
    pub step: Arc<AtomicU64>,
    pub observer: Observer,
}

struct Stage<B: Backend> {
    id: u64,
    device: String,
    actor: ActorRef<LayerMsg<B>>,
}

#[derive(Default)]
struct Pending {
    /// Micro-batch id → its index within the step (or evaluation).
    index: HashMap<u64, usize>,
    losses: Vec<f32>,
    issued: usize,
    done: usize,
}

enum Phase {
    Idle,
    Train(Pending),
    Eval(Pending),
    Finished,
    /// A stage died; waiting for the trainer to stop or rebuild the pipeline.
    Stalled,
}

pub struct SchedState<B: Backend> {
    cfg: Config,
    opts: SchedOptions,
    dims: Dims,
    init_cfg: InitConfig,
    schedule: Schedule,
    plan: Vec<Expansion>,
    loader: Loader,
    val: Vec<Vec<u32>>,
    ends: ActorRef<EndsMsg<B>>,
    stack: Vec<Stage<B>>,
    next_id: u64,
    step: u64,
    end: u64,
    next_mb: u64,
    phase: Phase,
    eval_pending: bool,
    stop_requested: bool,
    report: TrainReport,
    growth: Vec<GrowthRecord>,
    flops: (f64, f64),
    started: Instant,
    last_log: (Instant, u64),
    csv: Option<std::fs::File>,
    evals_csv: Option<std::fs::File>,
    trainer: ActorRef<TrainerMsg>,
    supervisor: ActorCell,
    roles: Roles,
    step_pub: Arc<AtomicU64>,
    observer: Observer,
    paused: bool,
    grow_now: Vec<RpcReplyPort<Result<usize, String>>>,
    checkpoint_now: Vec<RpcReplyPort<Result<String, String>>>,
    step_started: Instant,
    fixed_flops_ne: f64,
    /// The terminal progress bar (step, loss, lr, tok/s, depth, ETA), when stdout is a terminal.
    bar: Option<indicatif::ProgressBar>,
    /// One activation-buffer pool per device, shared by the stages placed there (see
    /// `model::ActPool`); stages born later on a device join its pool.
    pools: std::sync::Mutex<std::collections::BTreeMap<String, ActPool<B>>>,
}

pub struct SchedulerActor<B: Backend>(PhantomData<fn() -> B>);

impl<B: Backend> Default for SchedulerActor<B> {
    fn default() -> Self {
        SchedulerActor(PhantomData)
    }
}

type Res<T> = Result<T, ActorProcessingErr>;

/// Prefix of the errors that mean "a stage actor died under us". The scheduler does not fail on
/// them: the stage's own failure reaches the trainer, which names it and decides what to do.
const STAGE_GONE: &str = "stage gone: ";

fn err(e: impl std::fmt::Display) -> ActorProcessingErr {
    e.to_string().into()
}

fn gone(e: impl std::fmt::Display) -> ActorProcessingErr {
    err(format!("{STAGE_GONE}{e}"))
}

async fn ask<M: ractor::Message, T: Send + 'static>(actor: &ActorRef<M>, what: &str, build: impl FnOnce(RpcReplyPort<T>) -> M) -> Res<T> {
    match actor.call(build, None).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        Ok(ractor::rpc::CallResult::Timeout) => Err(err(format!("{what}: timed out"))),
        Ok(ractor::rpc::CallResult::SenderError) => Err(err(format!("{STAGE_GONE}{what}"))),
        Err(e) => Err(err(format!("{what}: {e}"))),
    }
}

impl<B: Backend> SchedState<B> {
    fn max_in_flight(&self) -> usize {
        let cap = self.cfg.pipeline.max_in_flight;
        let auto = self.stack.len() + 1;
        if cap == 0 { auto } else { cap }.max(1)
    }

    /// A log line: above the progress bar on a terminal, a plain `key=value` line otherwise.
    fn say(&self, line: String) {
        if self.opts.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }

    /// The pool of `device`, made on first use.
    fn pool(&self, device: &str) -> ActPool<B> {
        self.pools.lock().expect("pools lock").entry(device.to_string()).or_default().clone()
    }

    async fn spawn_layer(&self, id: u64, device: String, init: LayerInit) -> Res<Stage<B>> {
        let armed = !self.opts.faults_disarmed && self.cfg.faults.panic_layer == Some(id);
        let panic_at_step = armed.then_some(self.cfg.faults.panic_at_step).flatten();
        let args = LayerArgs {
            id,
            device: device.clone(),
            dims: self.dims.clone(),
            init,
            optim: self.cfg.optim.clone(),
            panic_at_step,
            observer: self.observer.clone(),
            pool: self.pool(&device),
        };
        let (actor, _) = Actor::spawn_linked(None, LayerActor::<B>::default(), args, self.supervisor.clone())
            .await
            .map_err(|e| err(format!("spawning layer {id} on {device}: {e}")))?;
        self.roles.lock().expect("roles lock").insert(actor.get_id(), format!("layer {id} ({device})"));
        Ok(Stage { id, device, actor })
    }

    /// Tell every stage its neighbours. Called whenever the stack changes (nothing in flight).
    fn relink(&self) -> Res<()> {
        let n = self.stack.len();
        self.ends
            .cast(EndsMsg::Link { first: self.stack.first().map(|s| s.actor.clone()), last: self.stack.last().map(|s| s.actor.clone()) })
            .map_err(gone)?;
        for (i, s) in self.stack.iter().enumerate() {
            let prev = if i == 0 { Peer::Ends(self.ends.clone()) } else { Peer::Layer(self.stack[i - 1].actor.clone()) };
            let next = if i + 1 == n { Peer::Ends(self.ends.clone()) } else { Peer::Layer(self.stack[i + 1].actor.clone()) };
            s.actor.cast(LayerMsg::Link { prev, next }).map_err(gone)?;
        }
        Ok(())
    }

    /// `GrowNow`: take the next expansion of the plan and apply it at this boundary.
    async fn grow_next_planned(&mut self) -> Result<usize, String> {
        let Some(i) = self.plan.iter().position(|e| e.to_depth > self.stack.len()) else {
            return Err(format!("no expansion left in the growth plan (depth is {})", self.stack.len()));
        };
        let mut e = self.plan.remove(i);
        e.at_step = self.step;
        self.grow(&e).await.map_err(|e| e.to_string())?;
        Ok(self.stack.len())
    }

    /// Apply the expansions due before the update of the current step.
    async fn grow_if_due(&mut self) -> Res<()> {
        let due: Vec<Expansion> = self.plan.iter().filter(|e| e.at_step == self.step).cloned().collect();
        for e in due {
            self.grow(&e).await?;
        }
        Ok(())
    }

    async fn grow(&mut self, e: &Expansion) -> Res<()> {
        let t0 = Instant::now();
        let ls = self.stack.len();
        if e.to_depth <= ls {
            return Err(err(format!("expansion at step {} to depth {} but the model has {ls} blocks", e.at_step, e.to_depth)));
        }
        let k = e.to_depth - ls;
        let sources = plan_sources(e.init, e.order, ls, k).map_err(err)?;
        // Trained state of every source block, read from its actor.
        let mut snaps: HashMap<usize, UnitState> = HashMap::new();
        for i in sources.iter().flatten() {
            if !snaps.contains_key(i) {
                let st = ask(&self.stack[*i].actor, "GetState", LayerMsg::GetState).await?;
                snaps.insert(*i, st);
            }
        }
        let positions: Vec<usize> = match e.position {
            Position::Bottom => (0..k).collect(),
            Position::Top => (ls..ls + k).collect(),
        };
        let old_devices: Vec<String> = self.stack.iter().map(|s| s.device.clone()).collect();
        let devices = placement::after_growth(
            self.cfg.placement.policy,
            &self.cfg.placement.devices,
            &old_devices,
            &positions,
            self.cfg.target_depth(),
        );
        // All newborns at once: each initialises its block on its own thread (its random stream
        // is keyed by its id, so the result does not depend on the order they run in).
        let spawns = sources.iter().enumerate().map(|(j, src)| {
            let id = self.next_id + j as u64;
            let init = LayerInit::Fresh {
                init: e.init,
                source: src.map(|i| snaps[&i].clone()),
                policy: e.opt_state,
                init_cfg: self.init_cfg.clone(),
            };
            self.spawn_layer(id, devices[positions[j]].clone(), init)
        });
        let mut newborn = futures::future::try_join_all(spawns).await?;
        self.next_id += k as u64;
        let new_ids: Vec<u64> = newborn.iter().map(|s| s.id).collect();
        if e.opt_state == OptStatePolicy::Reset {
            for s in &self.stack {
                ask(&s.actor, "ResetOptState", LayerMsg::ResetOptState).await?;
            }
            ask(&self.ends, "ResetOptState", EndsMsg::ResetOptState).await?;
        }
        match e.position {
            Position::Bottom => {
                newborn.append(&mut self.stack);
                self.stack = newborn;
            }
            Position::Top => self.stack.append(&mut newborn),
        }
        let moved = self.move_layers(&devices).await?;
        self.relink()?;
        let stack: Vec<u64> = self.stack.iter().map(|s| s.id).collect();
        self.growth.push(GrowthRecord {
            at_step: self.step,
            from_depth: ls,
            to_depth: e.to_depth,
            new_ids: new_ids.clone(),
            stack: stack.clone(),
        });
        self.report.growth.push(crate::model::growth::GrowthReport {
            from_depth: ls,
            to_depth: e.to_depth,
            new_ids: new_ids.clone(),
            stack: stack.clone(),
        });
        self.report.growth_wall_s.push(t0.elapsed().as_secs_f64());
        (self.observer)(&Event::Growth {
            step: self.step,
            from_depth: ls,
            to_depth: e.to_depth,
            new_ids: new_ids.clone(),
            seconds: t0.elapsed().as_secs_f64(),
        });
        self.say(format!(
            "grow step={} depth={ls}->{} new_ids={new_ids:?} stack={stack:?} moved={moved} wall_ms={:.1}",
            self.step,
            e.to_depth,
            t0.elapsed().as_secs_f64() * 1e3
        ));
        Ok(())
    }

    /// Move every layer whose device differs from `devices` (same stack order): snapshot,
    /// stop, respawn on the new device from the snapshot. Returns how many moved.
    async fn move_layers(&mut self, devices: &[String]) -> Res<usize> {
        let mut moved = 0;
        for i in 0..self.stack.len() {
            if self.stack[i].device == devices[i] {
                continue;
            }
            let st = ask(&self.stack[i].actor, "GetState", LayerMsg::GetState).await?;
            let old = &self.stack[i];
            old.actor.stop_and_wait(Some("moved to another device".into()), None).await.map_err(err)?;
            let new = self.spawn_layer(old.id, devices[i].clone(), LayerInit::Restore(st)).await?;
            self.stack[i] = new;
            moved += 1;
        }
        Ok(moved)
    }

    fn issue_train(&mut self, p: &mut Pending) -> Res<()> {
        let mbs = self.cfg.data.micro_batches;
        let dscale = 1.0 / (self.cfg.data.batch_size * self.cfg.data.seq_len * mbs) as f32;
        while p.issued < mbs && p.issued - p.done < self.max_in_flight() {
            let mb = self.next_mb;
            self.next_mb += 1;
            let mut windows = Vec::new();
            self.loader.next_batch(&mut windows);
            p.index.insert(mb, p.issued);
            p.issued += 1;
            self.ends.cast(EndsMsg::Micro { mb, windows, dscale }).map_err(gone)?;
        }
        (self.observer)(&Event::InFlight(p.issued - p.done));
        Ok(())
    }

    fn issue_eval(&mut self, p: &mut Pending) -> Res<()> {
        while p.issued < self.val.len() && p.issued - p.done < self.max_in_flight() {
            let mb = self.next_mb;
            self.next_mb += 1;
            p.index.insert(mb, p.issued);
            let windows = self.val[p.issued].clone();
            p.issued += 1;
            self.ends.cast(EndsMsg::EvalMicro { mb, windows }).map_err(gone)?;
        }
        Ok(())
    }

    /// At a step boundary: evaluate if due, otherwise start the next step or finish.
    async fn next(&mut self, me: &ActorRef<SchedMsg>) -> Res<()> {
        if self.stop_requested {
            return self.finish().await;
        }
        if !self.checkpoint_now.is_empty() {
            let r = self.write_checkpoint().await.map(|p| p.display().to_string()).map_err(|e| e.to_string());
            for reply in self.checkpoint_now.drain(..) {
                let _ = reply.send(r.clone());
            }
        }
        if !self.grow_now.is_empty() {
            let r = self.grow_next_planned().await;
            for reply in self.grow_now.drain(..) {
                let _ = reply.send(r.clone());
            }
        }
        if self.paused {
            return Ok(()); // `Resume` sends `Next` again
        }
        if self.eval_pending {
            self.eval_pending = false;
            let mut p = Pending { losses: vec![f32::NAN; self.val.len()], ..Default::default() };
            self.issue_eval(&mut p)?;
            self.phase = Phase::Eval(p);
            return Ok(());
        }
        if self.step >= self.end {
            return self.finish().await;
        }
        self.grow_if_due().await?;
        self.step_started = Instant::now();
        let mut p = Pending { losses: vec![f32::NAN; self.cfg.data.micro_batches], ..Default::default() };
        self.issue_train(&mut p)?;
        self.phase = Phase::Train(p);
        let _ = me;
        Ok(())
    }

    /// All micro-batches of the step are done: the optimizer step on every stage, records, logs.
    async fn end_step(&mut self, me: &ActorRef<SchedMsg>, losses: Vec<f32>) -> Res<()> {
        let lr = self.schedule.lr_at(self.step);
        let step = self.step;
        // The barrier: every stage steps; wait for all of them.
        let mut waits: Vec<ractor::concurrency::OneshotReceiver<f64>> = Vec::with_capacity(self.stack.len() + 1);
        let (tx, rx) = ractor::concurrency::oneshot();
        self.ends.cast(EndsMsg::Step { lr, step, reply: tx.into() }).map_err(gone)?;
        waits.push(rx);
        for s in &self.stack {
            let (tx, rx) = ractor::concurrency::oneshot();
            s.actor.cast(LayerMsg::Step { lr, step, reply: tx.into() }).map_err(gone)?;
            waits.push(rx);
        }
        let mut grad_sumsq = 0.0f64;
        for w in waits {
            grad_sumsq += w.await.map_err(|_| err(format!("{STAGE_GONE}optimizer step {step}")))?;
        }
        let grad_norm = grad_sumsq.sqrt();
        let mbs = losses.len();
        let loss = (losses.iter().map(|&l| l as f64).sum::<f64>() / mbs as f64) as f32;
        let depth = self.stack.len();
        let tokens = (self.cfg.data.batch_size * self.cfg.data.seq_len * mbs) as f64;
        self.flops.0 += flops::flops_per_token_llmc(&self.dims, depth, self.cfg.data.seq_len) * tokens;
        self.flops.1 += flops::flops_per_token_non_embedding(&self.dims, depth) * tokens;
        self.fixed_flops_ne += flops::flops_per_token_non_embedding(&self.dims, self.cfg.target_depth()) * tokens;
        self.step += 1;
        self.step_pub.store(self.step, Ordering::Relaxed);
        let rec = StepRecord {
            step: self.step,
            depth,
            lr,
            train_loss: loss,
            flops_llmc: self.flops.0,
            flops_ne: self.flops.1,
            elapsed_s: self.started.elapsed().as_secs_f64(),
        };
        if let Some(f) = self.csv.as_mut() {
            // Streamed (and flushed) per step, so a killed run leaves its trajectory behind.
            let _ = writeln!(
                f,
                "{},{},{},{},{:e},{:e},{:.3}",
                rec.step, rec.depth, rec.lr, rec.train_loss, rec.flops_llmc, rec.flops_ne, rec.elapsed_s
            );
            let _ = f.flush();
        }
        (self.observer)(&Event::Step {
            step: self.step,
            total_steps: self.cfg.run.steps,
            depth,
            lr,
            train_loss: loss,
            tokens: tokens as u64,
            seconds: self.step_started.elapsed().as_secs_f64(),
            flops_llmc: self.flops.0,
            flops_ne: self.flops.1,
            fixed_flops_ne: self.fixed_flops_ne,
            grad_norm,
            params: (flops::total_params(&self.dims, depth), flops::non_embedding_params(&self.dims, depth)),
        });
        for (device, pool) in self.pools.lock().expect("pools lock").iter() {
            (self.observer)(&Event::Buffers { device: device.clone(), allocated: pool.allocated(), peer_bytes_in: pool.peer_bytes_in() });
        }
        if !grad_norm.is_finite() {
            (self.observer)(&Event::NonFinite { step: self.step, what: format!("gradient norm {grad_norm}") });
        }
        if !loss.is_finite() {
            (self.observer)(&Event::NonFinite { step: self.step, what: format!("training loss {loss}") });
            return Err(err(format!("training loss became {loss} at step {} (depth {depth})", self.step)));
        }
        self.report.steps.push(rec);
        if let Some(bar) = &self.bar {
            let toks = tokens / self.step_started.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(self.step);
            bar.set_message(format!("depth={depth} loss={loss:.4} lr={lr:.2e} tok/s={toks:.0}"));
        }
        let le = self.cfg.run.log_every;
        if le > 0 && self.step % le == 0 {
            let dt = self.last_log.0.elapsed().as_secs_f64();
            let toks = (self.step - self.last_log.1) as f64 * tokens / dt.max(1e-9);
            self.say(format!(
                "step={}/{} depth={depth} train_loss={loss:.4} lr={lr:.6} tok/s={toks:.0} elapsed_s={:.1}",
                self.step,
                self.cfg.run.steps,
                self.started.elapsed().as_secs_f64()
            ));
            self.last_log = (Instant::now(), self.step);
        }
        if eval_due(&self.cfg, self.step) {
            self.eval_pending = true;
        } else {
            self.checkpoint_if_due().await?;
        }
        self.phase = Phase::Idle;
        me.cast(SchedMsg::Next).map_err(err)
    }

    async fn end_eval(&mut self, me: &ActorRef<SchedMsg>, losses: Vec<f32>) -> Res<()> {
        let val_loss = (losses.iter().map(|&l| l as f64).sum::<f64>() / losses.len() as f64) as f32;
        let e = EvalRecord {
            step: self.step,
            depth: self.stack.len(),
            val_loss,
            flops_llmc: self.flops.0,
            flops_ne: self.flops.1,
            elapsed_s: self.started.elapsed().as_secs_f64(),
        };
        self.say(format!(
            "step={}/{} depth={} val_loss={:.4} flops_llmc={:.3e} flops_ne={:.3e} elapsed_s={:.1}",
            e.step, self.cfg.run.steps, e.depth, e.val_loss, e.flops_llmc, e.flops_ne, e.elapsed_s
        ));
        if let Some(f) = self.evals_csv.as_mut() {
            let _ = writeln!(f, "{},{},{},{:e},{:e},{:.3}", e.step, e.depth, e.val_loss, e.flops_llmc, e.flops_ne, e.elapsed_s);
            let _ = f.flush();
        }
        (self.observer)(&Event::Eval { step: e.step, depth: e.depth, val_loss: e.val_loss });
        self.report.evals.push(e);
        if let Some(target) = self.opts.stop_below_val {
            if val_loss < target {
                self.say(format!("stop step={} val_loss={val_loss:.4} below {target}", self.step));
                self.end = self.step;
            }
        }
        self.checkpoint_if_due().await?;
        self.phase = Phase::Idle;
        me.cast(SchedMsg::Next).map_err(err)
    }

    async fn checkpoint_if_due(&mut self) -> Res<()> {
        let every = self.cfg.checkpoint.every;
        if every > 0 && self.step > 0 && self.step % every == 0 && self.step < self.end {
            self.write_checkpoint().await?;
        }
        Ok(())
    }

    /// Gather every unit's state and write one checkpoint (temp file, fsync, rename).
    async fn write_checkpoint(&mut self) -> Res<std::path::PathBuf> {
        let t0 = Instant::now();
        let (embed, head) = ask(&self.ends, "GetState", EndsMsg::GetState).await?;
        let mut units = vec![(UnitKey::Embed, embed), (UnitKey::Head, head)];
        for s in &self.stack {
            units.push((UnitKey::Layer(s.id), ask(&s.actor, "GetState", LayerMsg::GetState).await?));
        }
        let meta = Meta {
            format_version: checkpoint::FORMAT_VERSION,
            run_name: self.cfg.run.name.clone(),
            config_toml: self.cfg.to_toml(),
            step: self.step,
            depth: self.stack.len(),
            stack: self.stack.iter().map(|s| s.id).collect(),
            next_id: self.next_id,
            loader: self.loader.cursor(),
            growth: self.growth.clone(),
            created_unix_s: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            extra: serde_json::Value::Null,
        };
        let dir = self.cfg.checkpoint_dir();
        let keep = self.cfg.checkpoint.keep;
        let ck = Checkpoint { meta, units };
        let path = super::messages::compute(|| -> anyhow::Result<std::path::PathBuf> {
            let p = checkpoint::save(&dir, &ck)?;
            checkpoint::prune(&dir, keep)?;
            Ok(p)
        })
        .map_err(|e| err(format!("writing checkpoint at step {}: {e:#}", self.step)))?;
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        (self.observer)(&Event::Checkpoint {
            step: self.step,
            path: path.display().to_string(),
            seconds: t0.elapsed().as_secs_f64(),
            bytes,
        });
        self.say(format!("checkpoint step={} path={} wall_ms={:.1}", self.step, path.display(), t0.elapsed().as_secs_f64() * 1e3));
        Ok(path)
    }

    async fn finish(&mut self) -> Res<()> {
        if !matches!(self.phase, Phase::Finished) {
            self.phase = Phase::Finished;
            if self.cfg.checkpoint.every > 0 || self.stop_requested {
                self.write_checkpoint().await?;
            }
            if let Some(bar) = self.bar.take() {
                bar.finish_and_clear();
            }
            self.report.wall_s = self.started.elapsed().as_secs_f64();
            let report = std::mem::take(&mut self.report);
            self.trainer.cast(TrainerMsg::Finished(Ok(report))).map_err(err)?;
        }
        Ok(())
    }

    fn status(&self) -> Status {
        let in_flight = match &self.phase {
            Phase::Train(p) | Phase::Eval(p) => p.issued - p.done,
            _ => 0,
        };
        let elapsed_s = self.started.elapsed().as_secs_f64();
        let done_here = self.report.steps.len() as f64;
        let eta_s = (done_here > 0.0).then(|| elapsed_s / done_here * (self.end.saturating_sub(self.step)) as f64);
        Status {
            run: self.cfg.run.name.clone(),
            step: self.step,
            total_steps: self.cfg.run.steps,
            depth: self.stack.len(),
            stack: self.stack.iter().map(|s| (s.id, s.device.clone())).collect(),
            in_flight,
            paused: self.paused,
            elapsed_s,
            eta_s,
            placement: self.cfg.placement.devices.clone(),
        }
    }
}

/// A CSV log: appended to when resuming, started afresh (with `header`) otherwise.
fn open_log(path: &std::path::Path, resume: bool, header: &str) -> Res<std::fs::File> {
    let append = resume && path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    if !append {
        writeln!(f, "{header}").map_err(|e| err(format!("{}: {e}", path.display())))?;
    }
    Ok(f)
}

impl<B: Backend> Actor for SchedulerActor<B> {
    type Msg = SchedMsg;
    type State = SchedState<B>;
    type Arguments = SchedArgs;

    /// Build the pipeline: the ends actor and the initial layer actors (fresh, or restored from
    /// the newest valid checkpoint when resuming), linked under the supervisor.
    async fn pre_start(&self, me: ActorRef<SchedMsg>, a: SchedArgs) -> Res<SchedState<B>> {
        let cfg = a.cfg;
        let dims = dims_of(&cfg, a.data.vocab);
        let (b, t) = (cfg.data.batch_size, cfg.data.seq_len);
        let init_cfg = InitConfig::new(cfg.model.init, cfg.target_depth(), cfg.run.seed);
        let mut loader = Loader::new(a.data.train.clone(), b, t, cfg.run.seed).map_err(err)?;
        let val: Vec<Vec<u32>> = sequential_batches(&a.data.val, b, t, cfg.eval.batches).collect();
        if val.is_empty() {
            return Err(err(format!(
                "the validation split has {} tokens: too few for one batch of {b} x {} tokens",
                a.data.val.len(),
                t + 1
            )));
        }
        let resumed = if a.opts.resume {
            let dir = cfg.checkpoint_dir();
            match checkpoint::load_newest_valid(&dir).map_err(|e| err(format!("{e:#}")))? {
                Some((ck, path, warnings)) => {
                    for w in warnings {
                        eprintln!("warning: {w}");
                    }
                    if !a.opts.quiet {
                        println!("resume from={} step={} depth={}", path.display(), ck.meta.step, ck.meta.depth);
                    }
                    Some(ck)
                }
                None => {
                    if !a.opts.quiet {
                        println!("resume: no checkpoint in {}; starting fresh", dir.display());
                    }
                    None
                }
            }
        } else {
            None
        };
        let ends_device = cfg.placement.ends.clone().unwrap_or_else(|| cfg.placement.devices[0].clone());
        let mut units: HashMap<String, UnitState> = HashMap::new();
        if let Some(ck) = &resumed {
            for (k, u) in &ck.units {
                units.insert(k.to_string(), u.clone());
            }
            loader.restore(&ck.meta.loader);
        }
        let restore_ends = match &resumed {
            Some(_) => {
                let e = units.remove("embed").ok_or_else(|| err("checkpoint has no embedding unit"))?;
                let h = units.remove("head").ok_or_else(|| err("checkpoint has no head unit"))?;
                Some((e, h))
            }
            None => None,
        };
        let pools: std::collections::BTreeMap<String, ActPool<B>> = [(ends_device.clone(), ActPool::default())].into_iter().collect();
        let ends_args = EndsArgs {
            device: ends_device.clone(),
            dims: dims.clone(),
            init_cfg: init_cfg.clone(),
            optim: cfg.optim.clone(),
            b,
            t,
            scheduler: me.clone(),
            restore: restore_ends,
            observer: a.observer.clone(),
            pool: pools[&ends_device].clone(),
        };
        let (ends, _) = Actor::spawn_linked(None, EndsActor::<B>::default(), ends_args, a.supervisor.clone())
            .await
            .map_err(|e| err(format!("spawning the ends actor on {ends_device}: {e}")))?;
        a.roles.lock().expect("roles lock").insert(ends.get_id(), format!("ends (embedding and head, {ends_device})"));
        let (ids, step, next_id, growth) = match &resumed {
            Some(ck) => (ck.meta.stack.clone(), ck.meta.step, ck.meta.next_id, ck.meta.growth.clone()),
            None => ((0..cfg.model.depth as u64).collect(), 0, cfg.model.depth as u64, Vec::new()),
        };
        let devices = placement::initial(cfg.placement.policy, &cfg.placement.devices, ids.len(), cfg.target_depth());
        let started = Instant::now();
        let mut st = SchedState {
            opts: a.opts.clone(),
            dims,
            init_cfg: init_cfg.clone(),
            schedule: cfg.schedule.clone(),
            // A resumed run drops the expansions its model already has (applied early by a
            // `GrowNow` before the checkpoint); for a fresh run every expansion exceeds the depth.
            plan: cfg.expansions().into_iter().filter(|e| e.to_depth > ids.len()).collect(),
            loader,
            val,
            ends,
            stack: Vec::new(),
            next_id,
            step,
            end: a.opts.stop_after.map_or(cfg.run.steps, |s| s.min(cfg.run.steps)),
            next_mb: 0,
            phase: Phase::Idle,
            eval_pending: step == 0,
            stop_requested: false,
            report: TrainReport::default(),
            growth,
            flops: (0.0, 0.0),
            started,
            last_log: (started, step),
            csv: None,
            evals_csv: None,
            trainer: a.trainer,
            supervisor: a.supervisor,
            roles: a.roles,
            step_pub: a.step,
            observer: a.observer,
            paused: false,
            grow_now: Vec::new(),
            checkpoint_now: Vec::new(),
            step_started: started,
            fixed_flops_ne: 0.0,
            bar: None,
            pools: std::sync::Mutex::new(pools),
            cfg,
        };
        st.step_pub.store(step, Ordering::Relaxed);
        if !st.opts.quiet && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            let bar = indicatif::ProgressBar::new(st.end);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(step);
            st.bar = Some(bar);
        }
        let mut inits = Vec::with_capacity(ids.len());
        for id in &ids {
            inits.push(match units.remove(&UnitKey::Layer(*id).to_string()) {
                Some(u) => LayerInit::Restore(u),
                None if resumed.is_some() => {
                    return Err(err(format!("checkpoint lists layer {id} in its stack but holds no tensors for it")))
                }
                None => LayerInit::Fresh {
                    init: crate::model::growth::GrowInit::Random,
                    source: None,
                    policy: OptStatePolicy::Inherit,
                    init_cfg: init_cfg.clone(),
                },
            });
        }
        // Spawned together: each layer initialises (or restores) its block on its own thread.
        let spawns = ids.iter().zip(inits).enumerate().map(|(i, (id, init))| st.spawn_layer(*id, devices[i].clone(), init));
        st.stack = futures::future::try_join_all(spawns).await?;
        st.relink()?;
        // The trajectory, streamed: appended to across resumes.
        let out = st.cfg.out_dir();
        std::fs::create_dir_all(&out).map_err(|e| err(format!("creating {}: {e}", out.display())))?;
        st.csv = Some(open_log(&out.join("steps.csv"), st.opts.resume, "step,depth,lr,train_loss,flops_llmc,flops_ne,elapsed_s")?);
        st.evals_csv = Some(open_log(&out.join("evals.csv"), st.opts.resume, "step,depth,val_loss,flops_llmc,flops_ne,elapsed_s")?);
        me.cast(SchedMsg::Next).map_err(err)?;
        Ok(st)
    }

    async fn handle(&self, me: ActorRef<SchedMsg>, msg: SchedMsg, s: &mut SchedState<B>) -> Res<()> {
        match self.dispatch(me, msg, s).await {
            Err(e) if e.to_string().starts_with(STAGE_GONE) => {
                s.phase = Phase::Stalled;
                Ok(())
            }
            other => other,
        }
    }
}

impl<B: Backend> SchedulerActor<B> {
    async fn dispatch(&self, me: ActorRef<SchedMsg>, msg: SchedMsg, s: &mut SchedState<B>) -> Res<()> {
        match msg {
            SchedMsg::Next => {
                if matches!(s.phase, Phase::Idle) {
                    s.next(&me).await?;
                }
            }
            SchedMsg::MicroDone { mb, loss } => {
                let mut p = match std::mem::replace(&mut s.phase, Phase::Idle) {
                    Phase::Train(p) => p,
                    other => {
                        s.phase = other;
                        return Err(err(format!("micro-batch {mb} finished outside a training step")));
                    }
                };
                let i = *p.index.get(&mb).ok_or_else(|| err(format!("unknown micro-batch {mb}")))?;
                p.losses[i] = loss;
                p.done += 1;
                if p.done == s.cfg.data.micro_batches {
                    s.end_step(&me, p.losses).await?;
                } else {
                    s.issue_train(&mut p)?;
                    s.phase = Phase::Train(p);
                }
            }
            SchedMsg::EvalDone { mb, loss } => {
                let mut p = match std::mem::replace(&mut s.phase, Phase::Idle) {
                    Phase::Eval(p) => p,
                    other => {
                        s.phase = other;
                        return Err(err(format!("evaluation micro-batch {mb} finished outside an evaluation")));
                    }
                };
                let i = *p.index.get(&mb).ok_or_else(|| err(format!("unknown evaluation micro-batch {mb}")))?;
                p.losses[i] = loss;
                p.done += 1;
                if p.done == s.val.len() {
                    s.end_eval(&me, p.losses).await?;
                } else {
                    s.issue_eval(&mut p)?;
                    s.phase = Phase::Eval(p);
                }
            }
            SchedMsg::RequestStop => {
                if !s.stop_requested {
                    s.say(format!("stop requested at step {}: finishing the step, then checkpoint", s.step));
                }
                s.stop_requested = true;
                if matches!(s.phase, Phase::Idle) {
                    s.next(&me).await?;
                }
            }
            SchedMsg::Status(reply) => {
                let _ = reply.send(s.status());
            }
            SchedMsg::Pause => {
                s.paused = true;
                (s.observer)(&Event::Paused(true));
            }
            SchedMsg::Resume => {
                if s.paused {
                    s.paused = false;
                    (s.observer)(&Event::Paused(false));
                    me.cast(SchedMsg::Next).map_err(err)?;
                }
            }
            SchedMsg::GrowNow(reply) => {
                s.grow_now.push(reply);
                if matches!(s.phase, Phase::Idle) {
                    s.next(&me).await?;
                }
            }
            SchedMsg::CheckpointNow(reply) => {
                s.checkpoint_now.push(reply);
                if matches!(s.phase, Phase::Idle) {
                    s.next(&me).await?;
                }
            }
        }
        Ok(())
    }
}
