//! `SupervisorActor`: the supervision root of a run, and the runtime's entry points ([`train`],
//! [`start`]).
//!
//! It spawns the scheduler linked to itself; the scheduler spawns every actor of the pipeline (the
//! embed-head actor and one actor per layer, including those born at τ) linked to the supervisor
//! too, so every failure of any actor of the run arrives here. What a failure means is decided here:
//! - `supervision.restart_on_failure = false` (default): stop the run with an error that names
//!   the failed actor (e.g. `layer 3 (cpu:1)`) and the step;
//! - `true`: stop the pipeline and rebuild it from the newest valid checkpoint, at most
//!   `supervision.max_restarts` times, then fail as above.
//!
//! A stop request (SIGTERM, SIGINT) is forwarded to the scheduler, which finishes the current
//! step, writes a checkpoint and ends the run normally.

use super::error::RunError;
use super::events::{self, Event, Observer};
use super::scheduler::{RunEnded, SchedulerActor, SchedulerArgs, SchedulerMsg, Status};
use super::Roles;
use crate::backend::Backend;
use crate::config::Config;
use crate::data::Dataset;
use crate::train::{RunOptions, TrainReport};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub enum SupervisorMsg {
    /// The scheduler ended the run (normally, or with an error it detected itself).
    Finished(Result<TrainReport, RunError>),
    /// Finish the current step, checkpoint, stop.
    RequestStop,
    /// Stop at the next micro-batch boundary, dropping the step in progress (see
    /// `SchedulerMsg::ForceStop`).
    ForceStop,
    /// Where the run is (None while the pipeline is being rebuilt).
    Status(RpcReplyPort<Option<Status>>),
    /// Control requests, forwarded to the scheduler (see `SchedulerMsg`).
    Pause,
    Resume,
    GrowNow(RpcReplyPort<Result<usize, RunError>>),
    CheckpointNow(RpcReplyPort<Result<PathBuf, RunError>>),
}

pub struct SupervisorArgs {
    pub cfg: Config,
    pub data: Arc<Dataset>,
    pub opts: RunOptions,
    pub done: tokio::sync::oneshot::Sender<Result<TrainReport, RunError>>,
    pub observer: Observer,
}

pub struct SupervisorState {
    cfg: Config,
    data: Arc<Dataset>,
    opts: RunOptions,
    scheduler: Option<ActorRef<SchedulerMsg>>,
    roles: Roles,
    step: Arc<AtomicU64>,
    restarts: u32,
    stopping: bool,
    stop_requested: bool,
    force_requested: bool,
    done: Option<tokio::sync::oneshot::Sender<Result<TrainReport, RunError>>>,
    observer: Observer,
}

pub struct SupervisorActor<B: Backend>(PhantomData<fn() -> B>);

impl<B: Backend> Default for SupervisorActor<B> {
    fn default() -> Self {
        SupervisorActor(PhantomData)
    }
}

impl<B: Backend> SupervisorActor<B> {
    async fn start_pipeline(me: &ActorRef<SupervisorMsg>, s: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        let args = SchedulerArgs {
            cfg: s.cfg.clone(),
            data: s.data.clone(),
            opts: s.opts.clone(),
            ended: me.get_derived(),
            supervisor: me.get_cell(),
            roles: s.roles.clone(),
            step: s.step.clone(),
            observer: s.observer.clone(),
        };
        let (scheduler, _) = Actor::spawn_linked(None, SchedulerActor::<B>::default(), args, me.get_cell())
            .await
            .map_err(|e| super::error::from_spawn("starting the pipeline", e))?;
        s.roles.lock().expect("roles lock").insert(scheduler.get_id(), "scheduler".into());
        if s.stop_requested {
            let _ = scheduler.cast(SchedulerMsg::RequestStop);
        }
        if s.force_requested {
            let _ = scheduler.cast(SchedulerMsg::ForceStop);
        }
        s.scheduler = Some(scheduler);
        Ok(())
    }

    /// Stop every actor of the pipeline and wait for them.
    async fn stop_pipeline(me: &ActorRef<SupervisorMsg>, s: &mut SupervisorState) {
        s.scheduler = None;
        for child in me.get_children() {
            let _ = child.stop_and_wait(Some("pipeline stopped".into()), Some(std::time::Duration::from_secs(30))).await;
        }
        s.roles.lock().expect("roles lock").clear();
    }

    async fn finish(me: &ActorRef<SupervisorMsg>, s: &mut SupervisorState, r: Result<TrainReport, RunError>) {
        s.stopping = true;
        Self::stop_pipeline(me, s).await;
        if let Some(tx) = s.done.take() {
            let _ = tx.send(r);
        }
        me.stop(None);
    }
}

impl<B: Backend> Actor for SupervisorActor<B> {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(&self, _me: ActorRef<SupervisorMsg>, a: SupervisorArgs) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            cfg: a.cfg,
            data: a.data,
            opts: a.opts,
            scheduler: None,
            roles: Arc::new(Mutex::new(HashMap::new())),
            step: Arc::new(AtomicU64::new(0)),
            restarts: 0,
            stopping: false,
            stop_requested: false,
            force_requested: false,
            done: Some(a.done),
            observer: a.observer,
        })
    }

    async fn post_start(&self, me: ActorRef<SupervisorMsg>, s: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        if let Err(e) = Self::start_pipeline(&me, s).await {
            Self::finish(&me, s, Err(RunError::from_actor(&e))).await;
        }
        Ok(())
    }

    async fn handle(&self, me: ActorRef<SupervisorMsg>, msg: SupervisorMsg, s: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Finished(r) => Self::finish(&me, s, r).await,
            SupervisorMsg::ForceStop => {
                s.stop_requested = true;
                s.force_requested = true;
                if let Some(scheduler) = &s.scheduler {
                    let _ = scheduler.cast(SchedulerMsg::ForceStop);
                }
            }
            SupervisorMsg::RequestStop => {
                s.stop_requested = true;
                if let Some(scheduler) = &s.scheduler {
                    let _ = scheduler.cast(SchedulerMsg::RequestStop);
                }
            }
            SupervisorMsg::Status(reply) => {
                let st = match &s.scheduler {
                    Some(scheduler) => match scheduler.call(SchedulerMsg::Status, Some(std::time::Duration::from_secs(5))).await {
                        Ok(ractor::rpc::CallResult::Success(st)) => Some(st),
                        _ => None,
                    },
                    None => None,
                };
                let _ = reply.send(st);
            }
            SupervisorMsg::Pause => {
                if let Some(scheduler) = &s.scheduler {
                    let _ = scheduler.cast(SchedulerMsg::Pause);
                }
            }
            SupervisorMsg::Resume => {
                if let Some(scheduler) = &s.scheduler {
                    let _ = scheduler.cast(SchedulerMsg::Resume);
                }
            }
            SupervisorMsg::GrowNow(reply) => match &s.scheduler {
                Some(scheduler) => {
                    let _ = scheduler.cast(SchedulerMsg::GrowNow(reply));
                }
                None => {
                    let _ = reply.send(Err(RunError::Refused("the pipeline is restarting".into())));
                }
            },
            SupervisorMsg::CheckpointNow(reply) => match &s.scheduler {
                Some(scheduler) => {
                    let _ = scheduler.cast(SchedulerMsg::CheckpointNow(reply));
                }
                None => {
                    let _ = reply.send(Err(RunError::Refused("the pipeline is restarting".into())));
                }
            },
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        s: &mut SupervisorState,
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
                Self::finish(&me, s, Err(RunError::ActorFailed(format!("{what}; restart failed: {}", RunError::from_actor(&e))))).await;
            }
        } else {
            let tail = if sup.restart_on_failure { format!(" (after {} restarts)", s.restarts) } else { String::new() };
            Self::finish(&me, s, Err(RunError::ActorFailed(format!("{what}{tail}")))).await;
        }
        Ok(())
    }
}

impl From<RunEnded> for SupervisorMsg {
    fn from(e: RunEnded) -> Self {
        SupervisorMsg::Finished(e.0)
    }
}

impl TryFrom<SupervisorMsg> for RunEnded {
    type Error = SupervisorMsg;
    fn try_from(m: SupervisorMsg) -> Result<Self, Self::Error> {
        match m {
            SupervisorMsg::Finished(r) => Ok(RunEnded(r)),
            other => Err(other),
        }
    }
}

/// Train `cfg` on the actor runtime; blocks until the run ends. With `signals`, SIGINT and
/// SIGTERM stop the run at the next step boundary after writing a checkpoint.
pub fn train<B: Backend>(cfg: &Config, data: Dataset, opts: RunOptions, signals: bool) -> anyhow::Result<TrainReport> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(train_async::<B>(cfg, data, opts, signals))
}

/// A run in progress: its supervision root (send it `SupervisorMsg`s: status, pause, grow now,
/// …) and the promise of its result.
pub struct RunHandle {
    pub supervisor: ActorRef<SupervisorMsg>,
    pub done: tokio::sync::oneshot::Receiver<Result<TrainReport, RunError>>,
    pub join: ractor::concurrency::JoinHandle<()>,
    /// With pipeline stages in other processes: the task passing their stop requests on.
    stages: Option<tokio::task::JoinHandle<()>>,
}

impl RunHandle {
    /// Wait for the run to end.
    pub async fn wait(self) -> anyhow::Result<TrainReport> {
        let result = self.done.await.map_err(|_| anyhow::anyhow!("the supervisor stopped without a result"));
        let _ = self.join.await;
        if let Some(l) = self.stages {
            // The run is over: the other stages of this replica end too.
            l.abort();
            super::remote::shutdown_stages().await;
        }
        Ok(result??)
    }
}

/// Start a run inside an existing multi-thread tokio runtime; events go to `observer`.
pub async fn start<B: Backend>(cfg: &Config, data: Dataset, opts: RunOptions, observer: Observer) -> anyhow::Result<RunHandle> {
    // Every device of the placement must exist before any actor starts: a clear error naming
    // the key, rather than a failed actor halfway through a growth.
    let mut seen = std::collections::HashSet::new();
    for d in cfg.placement.devices.iter().chain(cfg.placement.ends.iter()) {
        if seen.insert(d.clone()) {
            B::open(d).map_err(|e| RunError::Device(format!("`placement.devices`: {d}: {e:#}")))?;
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let topo = opts.topology;
    if topo != crate::dist::topology() {
        return Err(RunError::Config(format!(
            "`RunOptions::topology` says {topo:?}, but this process is {:?}: pass the value `dist::init` returned",
            crate::dist::topology()
        ))
        .into());
    }
    let args = SupervisorArgs { cfg: cfg.clone(), data: Arc::new(data), opts, done: tx, observer };
    // A pipeline over several processes: frames from the other stages, and their stop requests.
    let mut requests = None;
    if topo.stages > 1 {
        super::remote::set_run(&cfg.run.name);
        requests = Some(super::remote::listen());
        super::remote::start_dispatch::<B>(super::StreamSettings::of(cfg))?;
    }
    let (supervisor, join) =
        Actor::spawn(None, SupervisorActor::<B>::default(), args).await.map_err(|e| anyhow::anyhow!("starting the supervisor: {e}"))?;
    let stages = requests.map(|mut requests| {
        let supervisor = supervisor.clone();
        tokio::spawn(async move {
            while let Some((q, _, req)) = requests.recv().await {
                if let super::frame::Request::StopRun { force } = req {
                    let what = if force {
                        "stopping at the next micro-batch boundary"
                    } else {
                        "finishing the current step, then checkpoint and stop"
                    };
                    eprintln!("pipeline stage {q} was signalled: {what}");
                    let _ = supervisor.cast(if force { SupervisorMsg::ForceStop } else { SupervisorMsg::RequestStop });
                }
            }
        })
    });
    Ok(RunHandle { supervisor, done: rx, join, stages })
}

/// What a stop signal asks for (see [`watch_stop_signals`]).
#[derive(Clone, Debug, PartialEq)]
pub enum StopStep {
    /// Finish the current step, checkpoint and end the run (the first signal, by name).
    Finish(&'static str),
    /// Stop at the next micro-batch boundary (a second signal, or the grace period over; why).
    Force(String),
}

/// Stop signals (SIGTERM, SIGINT) escalate: the first asks to finish the current step,
/// checkpoint and end the run ([`StopStep::Finish`]); the second — or the first when the step
/// has not finished within `grace` — to stop at the next micro-batch boundary, checkpoint the
/// last completed step and end the run with an error ([`StopStep::Force`]); the third exits the
/// process at once (code 130), after telling `say`. `on` carries out each step. The signal
/// streams are the caller's, so that it can install them before anything else starts; `early`
/// is `crate::signals::received()` read just after they were made.
pub fn watch_stop_signals(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    early: usize,
    grace: std::time::Duration,
    on: impl Fn(StopStep) + Send + 'static,
    say: impl Fn(&str) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    // Signals that came before the streams existed (`crate::signals`, read by the caller just
    // after it made them) count first.
    let early = early.min(2);
    tokio::spawn(async move {
        let mut seen = 0;
        let mut deadline: Option<tokio::time::Instant> = None;
        for _ in 0..early {
            seen += 1;
            if seen == 1 {
                deadline = Some(tokio::time::Instant::now() + grace);
                on(StopStep::Finish("a stop signal during start-up"));
            } else {
                deadline = None;
                on(StopStep::Force("a second stop signal during start-up".into()));
            }
        }
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    deadline = None;
                    on(StopStep::Force(format!("the stop grace period of {} s is over", grace.as_secs())));
                    continue;
                }
            };
            seen += 1;
            match seen {
                1 => {
                    deadline = Some(tokio::time::Instant::now() + grace);
                    on(StopStep::Finish(name));
                }
                2 => {
                    deadline = None;
                    on(StopStep::Force(format!("{name} again")));
                }
                _ => {
                    say(&format!("{name} a third time: exiting now"));
                    std::process::exit(130);
                }
            }
        }
    })
}

/// [`train`] inside an existing multi-thread tokio runtime.
pub async fn train_async<B: Backend>(cfg: &Config, data: Dataset, opts: RunOptions, signals: bool) -> anyhow::Result<TrainReport> {
    let topo = opts.topology;
    let run = start::<B>(cfg, data, opts, events::none()).await?;
    let grace = std::time::Duration::from_secs(cfg.run.stop_grace_s);
    let supervisor = run.supervisor.clone();
    let watcher = signals
        .then(|| {
            let on = move |step: StopStep| {
                let msg = match step {
                    StopStep::Finish(name) => {
                        // Under MPI the step needs every rank: mpirun also sends SIGTERM when a
                        // rank has died, and then no checkpoint can follow.
                        let caveat = if topo.size() > 1 {
                            " if every rank is still there (a rank that is gone makes that impossible: then the newest checkpoint on disk stands)"
                        } else {
                            ""
                        };
                        eprintln!("{name}: finishing the current step, then checkpoint and stop{caveat} (again to stop at once)");
                        SupervisorMsg::RequestStop
                    }
                    StopStep::Force(why) => {
                        eprintln!("{why}: stopping at the next micro-batch boundary (a third signal exits now)");
                        SupervisorMsg::ForceStop
                    }
                };
                let _ = supervisor.cast(msg);
            };
            use tokio::signal::unix::{signal, SignalKind};
            match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(term), Ok(int)) => Some(watch_stop_signals(term, int, crate::signals::received(), grace, on, |m| eprintln!("{m}"))),
                _ => None, // no signal handling: the default disposition stays
            }
        })
        .flatten();
    let result = run.wait().await;
    if let Some(w) = watcher {
        w.abort();
    }
    result
}
