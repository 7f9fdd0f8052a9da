//! `TrainerActor`: the supervision root of a run.
//!
//! It spawns the scheduler linked to itself; the scheduler spawns every stage actor (the ends and
//! one actor per layer, including those born at τ) linked to the trainer too, so every failure
//! of any actor of the run arrives here. What a failure means is decided here:
//! - `supervision.restart_on_failure = false` (default): stop the run with an error that names
//!   the failed actor (e.g. `layer 3 (cpu:1)`) and the step;
//! - `true`: stop the pipeline and rebuild it from the newest valid checkpoint, at most
//!   `supervision.max_restarts` times, then fail as above.
//!
//! A stop request (SIGTERM, SIGINT) is forwarded to the scheduler, which finishes the current
//! step, writes a checkpoint and ends the run normally.

use super::events::{Event, Observer};
use super::scheduler::{SchedArgs, SchedMsg, SchedOptions, SchedulerActor, Status};
use crate::backend::Backend;
use crate::config::Config;
use crate::data::Dataset;
use crate::train::TrainReport;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Actor id → what it is ("layer 3 (cpu:1)"), so failures can be named.
pub type Roles = Arc<Mutex<HashMap<ActorId, String>>>;

pub enum TrainerMsg {
    /// The scheduler ended the run (normally, or with an error it detected itself).
    Finished(Result<TrainReport, String>),
    /// Finish the current step, checkpoint, stop.
    RequestStop,
    /// Where the run is (None while the pipeline is being rebuilt).
    Status(RpcReplyPort<Option<Status>>),
    /// Control requests, forwarded to the scheduler (see `SchedMsg`).
    Pause,
    Resume,
    GrowNow(RpcReplyPort<Result<usize, String>>),
    CheckpointNow(RpcReplyPort<Result<String, String>>),
}

pub struct TrainerArgs {
    pub cfg: Config,
    pub data: Arc<Dataset>,
    pub opts: SchedOptions,
    pub done: tokio::sync::oneshot::Sender<Result<TrainReport, String>>,
    pub observer: Observer,
}

pub struct TrainerState {
    cfg: Config,
    data: Arc<Dataset>,
    opts: SchedOptions,
    scheduler: Option<ActorRef<SchedMsg>>,
    roles: Roles,
    step: Arc<AtomicU64>,
    restarts: u32,
    stopping: bool,
    stop_requested: bool,
    done: Option<tokio::sync::oneshot::Sender<Result<TrainReport, String>>>,
    observer: Observer,
}

pub struct TrainerActor<B: Backend>(PhantomData<fn() -> B>);

impl<B: Backend> Default for TrainerActor<B> {
    fn default() -> Self {
        TrainerActor(PhantomData)
    }
}

impl<B: Backend> TrainerActor<B> {
    async fn start_pipeline(me: &ActorRef<TrainerMsg>, s: &mut TrainerState) -> Result<(), ActorProcessingErr> {
        let args = SchedArgs {
            cfg: s.cfg.clone(),
            data: s.data.clone(),
            opts: s.opts.clone(),
            trainer: me.clone(),
            supervisor: me.get_cell(),
            roles: s.roles.clone(),
            step: s.step.clone(),
            observer: s.observer.clone(),
        };
        let (sched, _) = Actor::spawn_linked(None, SchedulerActor::<B>::default(), args, me.get_cell())
            .await
            .map_err(|e| format!("starting the pipeline: {e}"))?;
        s.roles.lock().expect("roles lock").insert(sched.get_id(), "scheduler".into());
        if s.stop_requested {
            let _ = sched.cast(SchedMsg::RequestStop);
        }
        s.scheduler = Some(sched);
        Ok(())
    }

    /// Stop every actor of the pipeline and wait for them.
    async fn stop_pipeline(me: &ActorRef<TrainerMsg>, s: &mut TrainerState) {
        s.scheduler = None;
        for child in me.get_children() {
            let _ = child.stop_and_wait(Some("pipeline stopped".into()), Some(std::time::Duration::from_secs(30))).await;
        }
        s.roles.lock().expect("roles lock").clear();
    }

    async fn finish(me: &ActorRef<TrainerMsg>, s: &mut TrainerState, r: Result<TrainReport, String>) {
        s.stopping = true;
        Self::stop_pipeline(me, s).await;
        if let Some(tx) = s.done.take() {
            let _ = tx.send(r);
        }
        me.stop(None);
    }
}

impl<B: Backend> Actor for TrainerActor<B> {
    type Msg = TrainerMsg;
    type State = TrainerState;
    type Arguments = TrainerArgs;

    async fn pre_start(&self, _me: ActorRef<TrainerMsg>, a: TrainerArgs) -> Result<TrainerState, ActorProcessingErr> {
        Ok(TrainerState {
            cfg: a.cfg,
            data: a.data,
            opts: a.opts,
            scheduler: None,
            roles: Arc::new(Mutex::new(HashMap::new())),
            step: Arc::new(AtomicU64::new(0)),
            restarts: 0,
            stopping: false,
            stop_requested: false,
            done: Some(a.done),
            observer: a.observer,
        })
    }

    async fn post_start(&self, me: ActorRef<TrainerMsg>, s: &mut TrainerState) -> Result<(), ActorProcessingErr> {
        if let Err(e) = Self::start_pipeline(&me, s).await {
            Self::finish(&me, s, Err(e.to_string())).await;
        }
        Ok(())
    }

    async fn handle(&self, me: ActorRef<TrainerMsg>, msg: TrainerMsg, s: &mut TrainerState) -> Result<(), ActorProcessingErr> {
        match msg {
            TrainerMsg::Finished(r) => Self::finish(&me, s, r).await,
            TrainerMsg::RequestStop => {
                s.stop_requested = true;
                if let Some(sched) = &s.scheduler {
                    let _ = sched.cast(SchedMsg::RequestStop);
                }
            }
            TrainerMsg::Status(reply) => {
                let st = match &s.scheduler {
                    Some(sched) => match sched.call(SchedMsg::Status, Some(std::time::Duration::from_secs(5))).await {
                        Ok(ractor::rpc::CallResult::Success(st)) => Some(st),
                        _ => None,
                    },
                    None => None,
                };
                let _ = reply.send(st);
            }
            TrainerMsg::Pause => {
                if let Some(sched) = &s.scheduler {
                    let _ = sched.cast(SchedMsg::Pause);
                }
            }
            TrainerMsg::Resume => {
                if let Some(sched) = &s.scheduler {
                    let _ = sched.cast(SchedMsg::Resume);
                }
            }
            TrainerMsg::GrowNow(reply) => match &s.scheduler {
                Some(sched) => {
                    let _ = sched.cast(SchedMsg::GrowNow(reply));
                }
                None => {
                    let _ = reply.send(Err("the pipeline is restarting".into()));
                }
            },
            TrainerMsg::CheckpointNow(reply) => match &s.scheduler {
                Some(sched) => {
                    let _ = sched.cast(SchedMsg::CheckpointNow(reply));
                }
                None => {
                    let _ = reply.send(Err("the pipeline is restarting".into()));
                }
            },
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<TrainerMsg>,
        evt: SupervisionEvent,
        s: &mut TrainerState,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, e) = evt else {
            return Ok(()); // starts and normal stops (moves, shutdown) need nothing
        };
        if s.stopping {
            return Ok(());
        }
        let role = s.roles.lock().expect("roles lock").get(&cell.get_id()).cloned().unwrap_or_else(|| format!("actor {}", cell.get_id()));
        let step = s.step.load(Ordering::Relaxed);
        let what = format!("{role} failed at step {step}: {e}");
        let sup = &s.cfg.supervision;
        if sup.restart_on_failure && s.restarts < sup.max_restarts {
            s.restarts += 1;
            eprintln!(
                "warning: {what}; restarting the pipeline from the newest checkpoint (restart {} of {})",
                s.restarts, sup.max_restarts
            );
            (s.observer)(&Event::Restart { step, reason: what.clone() });
            Self::stop_pipeline(&me, s).await;
            s.opts.resume = true;
            s.opts.faults_disarmed = true;
            if let Err(e) = Self::start_pipeline(&me, s).await {
                Self::finish(&me, s, Err(format!("{what}; restart failed: {e}"))).await;
            }
        } else {
            let tail = if sup.restart_on_failure { format!(" (after {} restarts)", s.restarts) } else { String::new() };
            Self::finish(&me, s, Err(format!("{what}{tail}"))).await;
        }
        Ok(())
    }
}
