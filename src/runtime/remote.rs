//! Pipeline stages in other processes (`[parallel] pipeline = P`): the layers placed on stage
//! q > 0 live in the process of stage q, and everything between them and the rest of the ring
//! travels as [`frame`](super::frame)s.
//!
//! ```text
//!   stage 0 (scheduler, embed-head, its layers)            stage q (its layers)
//!   SchedulerActor ── RemoteLayerActor ── Request ──►  host loop (`host::serve`) ── LayerActor
//!                                     ◄── Reply ──────
//!   LayerActor ─► RemotePeerActor ── Forward/Backward frame ──► dispatcher ─► LayerActor
//! ```
//!
//! Nothing in a layer actor or the embed-head actor knows about processes: a neighbour in
//! another process is a [`RemotePeerActor`], a `Peer` like any other, that downloads the
//! activation and sends it; in the receiving process the dispatcher thread uploads it into the
//! target device's pool and hands it to the local actor. The scheduler knows a remote layer as a
//! [`RemoteLayerActor`], which takes the same `LayerMsg`s as a `LayerActor` and turns each into a
//! request to the hosting stage. So the one-process code paths (steps, growth, moves,
//! checkpoints) run unchanged; a `balanced` move across processes is a `GetState` from one
//! stage and a `Spawn` with that state on another.
//!
//! Order: frames from one process to another arrive in the order they were sent (MPI's
//! non-overtaking rule, one communicator, one tag), and every hand-off from one unit to a
//! neighbour goes through one `RemotePeerActor`, so each layer sees its micro-batches in the
//! same order as in one process; that is why the result is bitwise the one-process pipeline's.

use super::compute;
use super::error::RunError;
use super::frame::{self, Addr, Dtype, Kind, Reply, Request, Unit};
use super::handoff::{hand, Activation, Handoff, Peer};
use super::layer::{LayerInit, LayerMsg};
use super::StreamSettings;
use crate::backend::pool::ActPool;
use crate::backend::Backend;
use crate::dist;
use anyhow::{bail, Context};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

/// Where frames for a unit of this process go: its actor, its device and that device's pool.
pub struct Route<B: Backend> {
    pub peer: Peer<B>,
    /// Shared, so that looking a route up for every frame copies no string.
    pub device: Arc<str>,
    pub pool: ActPool<B>,
}

/// The units of this process that frames can be addressed to.
pub struct Routes<B: Backend>(Mutex<HashMap<Unit, Route<B>>>);

impl<B: Backend> Routes<B> {
    pub fn set(&self, unit: Unit, route: Route<B>) {
        self.0.lock().expect("routes lock").insert(unit, route);
    }
    pub fn remove(&self, unit: Unit) {
        self.0.lock().expect("routes lock").remove(&unit);
    }
    pub fn clear(&self) {
        self.0.lock().expect("routes lock").clear();
    }
    fn get(&self, unit: Unit) -> Option<(Peer<B>, Arc<str>, ActPool<B>)> {
        self.0.lock().expect("routes lock").get(&unit).map(|r| (r.peer.clone(), r.device.clone(), r.pool.clone()))
    }
    pub fn peer(&self, unit: Unit) -> Option<Peer<B>> {
        self.get(unit).map(|r| r.0)
    }
}

/// This process's routes (one table per backend type; a process runs one).
pub fn routes<B: Backend>() -> Arc<Routes<B>> {
    static TABLES: LazyLock<Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>> = LazyLock::new(Default::default);
    let mut t = TABLES.lock().expect("route tables lock");
    let any = t.entry(TypeId::of::<B>()).or_insert_with(|| Arc::new(Routes::<B>(Mutex::new(HashMap::new())))).clone();
    any.downcast::<Routes<B>>().expect("the table of this backend")
}

static REPLIES: LazyLock<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Reply>>>> = LazyLock::new(Default::default);
static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);
/// Who takes the requests that arrive here (the host loop; on stage 0, the stop listener).
type Incoming = (usize, u64, Request);
static LISTENER: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Incoming>>> = Mutex::new(None);
/// The run this process's frames belong to (one per process).
static RUN: OnceLock<String> = OnceLock::new();
/// The step frames are stamped with (the last optimizer step this process saw).
static STEP: AtomicU64 = AtomicU64::new(0);

/// Name the run this process's frames belong to (a frame of another run is an error).
pub fn set_run(name: &str) {
    let set = RUN.get_or_init(|| name.to_string());
    debug_assert_eq!(set, name, "one run per process");
}

fn run_name() -> &'static str {
    RUN.get().map_or("", String::as_str)
}

/// The step to stamp frames with.
pub fn set_step(step: u64) {
    STEP.store(step, Ordering::Relaxed);
}

/// The world rank of stage `stage` of this replica.
fn rank_of(stage: usize) -> usize {
    dist::topology().rank_of(stage)
}

/// Take the requests that arrive at this process: (their stage, request id, request).
pub fn listen() -> tokio::sync::mpsc::UnboundedReceiver<Incoming> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    *LISTENER.lock().expect("listener lock") = Some(tx);
    rx
}

fn unit_of(req: &Request) -> Unit {
    match req {
        Request::Spawn { id, .. }
        | Request::Link { id, .. }
        | Request::Step { id, .. }
        | Request::GetState { id }
        | Request::SetState { id, .. }
        | Request::ResetOptState { id }
        | Request::InFlight { id }
        | Request::Stop { id } => Unit::Layer(*id),
        Request::StopRun { .. } | Request::Shutdown => Unit::Ends,
    }
}

fn send_request(stage: usize, id: u64, req: &Request) {
    let payload = frame::to_bincode(req);
    let f = frame::encode(
        Kind::Request { id },
        run_name(),
        STEP.load(Ordering::Relaxed),
        unit_of(req),
        Dtype::Bincode,
        vec![payload.len() as u64],
        &payload,
    );
    dist::send_frame(stage, f);
}

/// Ask stage `stage` and wait for its answer; a `Failed` answer is an error naming the stage,
/// its rank and the request.
pub async fn request(stage: usize, req: Request) -> Result<Reply, RunError> {
    let id = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed);
    let what = req.what();
    let (tx, rx) = tokio::sync::oneshot::channel();
    REPLIES.lock().expect("replies lock").insert(id, tx);
    send_request(stage, id, &req);
    match rx.await {
        Ok(Reply::Failed(e)) => Err(RunError::ActorFailed(format!("stage {stage} (rank {}): {what}: {e}", rank_of(stage)))),
        Ok(r) => Ok(r),
        Err(_) => Err(RunError::Protocol(format!("no answer from stage {stage} to {what}"))),
    }
}

/// Tell stage `stage` something that needs no answer.
pub fn notify(stage: usize, req: Request) {
    send_request(stage, 0, &req);
}

/// Answer request `id` of stage `stage`.
pub fn reply(stage: usize, id: u64, rep: Reply) {
    let payload = frame::to_bincode(&rep);
    let f = frame::encode(
        Kind::Reply { id },
        run_name(),
        STEP.load(Ordering::Relaxed),
        Unit::Ends,
        Dtype::Bincode,
        vec![payload.len() as u64],
        &payload,
    );
    dist::send_frame(stage, f);
}

fn unexpected(what: &str) -> RunError {
    RunError::Protocol(format!("an unexpected answer to {what}"))
}

/// Start the thread that takes this process's incoming frames (once per process): activations
/// are uploaded into their unit's device and handed to it, requests go to [`listen`]'s
/// receiver, answers to the [`request`] waiting for them. A frame that cannot be delivered
/// (damaged, of another run, for a unit not here) stops the whole run with an error naming this
/// rank.
pub fn start_dispatch<B: Backend>(settings: StreamSettings) -> anyhow::Result<()> {
    static STARTED: OnceLock<()> = OnceLock::new();
    if STARTED.set(()).is_err() {
        return Ok(());
    }
    let rx = dist::take_incoming().context("the frames of this process were taken already (MPI is not running?)")?;
    let routes = routes::<B>();
    std::thread::Builder::new().name("taproot-frames".into()).spawn(move || {
        let mut streams: HashMap<String, B> = HashMap::new();
        let mut host = Vec::new();
        for (from, bytes) in rx {
            if let Err(e) = dispatch_one::<B>(&bytes, from, &routes, &mut streams, &mut host, settings) {
                eprintln!("error (rank {}): a frame from stage {from}: {e:#}", dist::topology().rank());
                dist::abort(1);
            }
        }
    })?;
    Ok(())
}

fn dispatch_one<B: Backend>(
    bytes: &[u8],
    from: usize,
    routes: &Routes<B>,
    streams: &mut HashMap<String, B>,
    host: &mut Vec<f32>,
    settings: StreamSettings,
) -> anyhow::Result<()> {
    let (h, payload) = frame::decode(bytes)?;
    let run = run_name();
    if h.run != run {
        bail!("the frame belongs to run {:?}; this process runs {run:?}", h.run);
    }
    match h.kind {
        Kind::Forward { .. } | Kind::Backward { .. } => {
            let Some((peer, device, pool)) = routes.get(h.to) else {
                bail!("{} is not on stage {}", h.to, dist::topology().stage);
            };
            if !streams.contains_key(&*device) {
                streams.insert(device.to_string(), super::open_stream::<B>(&device, settings)?);
            }
            let be = &streams[&*device];
            frame::f32s(payload, host);
            let (b, t) = (h.shape[0] as usize, h.shape[1] as usize);
            let buf = pool.take(be, host.len());
            be.upload(B::whole(&buf), host);
            let x = Activation::send(be, buf, b, t, &pool);
            let msg = match h.kind {
                Kind::Forward { mb, eval } => Handoff::Forward { mb, x, eval },
                Kind::Backward { mb } => Handoff::Backward { mb, grad: x },
                _ => unreachable!("matched above"),
            };
            hand(&peer, msg);
        }
        Kind::Request { id } => {
            let req: Request = frame::from_bincode(payload)?;
            match LISTENER.lock().expect("listener lock").as_ref() {
                Some(l) => {
                    let _ = l.send((from, id, req));
                }
                None => {
                    eprintln!("warning (rank {}): {} from stage {from} arrived with nobody to take it", dist::topology().rank(), req.what())
                }
            }
        }
        Kind::Reply { id } => {
            let rep: Reply = frame::from_bincode(payload)?;
            if let Some(tx) = REPLIES.lock().expect("replies lock").remove(&id) {
                let _ = tx.send(rep);
            }
        }
    }
    Ok(())
}

/// A neighbour in another process, as a `Peer`: each activation handed to it is downloaded
/// from `device` (the sender's) and sent to `to` as a frame. One per (unit, direction), so the
/// frames of one hand-off path keep their order.
pub struct RemotePeerActor<B: Backend>(PhantomData<fn() -> B>);

impl<B: Backend> Default for RemotePeerActor<B> {
    fn default() -> Self {
        RemotePeerActor(PhantomData)
    }
}

pub struct RemotePeerArgs {
    pub device: String,
    pub settings: StreamSettings,
    pub to: Addr,
}

pub struct RemotePeerState<B: Backend> {
    be: B,
    to: Addr,
    host: Vec<f32>,
}

impl<B: Backend> Actor for RemotePeerActor<B> {
    type Msg = Handoff<B>;
    type State = RemotePeerState<B>;
    type Arguments = RemotePeerArgs;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, a: RemotePeerArgs) -> Result<Self::State, ActorProcessingErr> {
        let be = super::open_stream::<B>(&a.device, a.settings).map_err(|e| RunError::Device(format!("{}: {e:#}", a.device)))?;
        Ok(RemotePeerState { be, to: a.to, host: Vec::new() })
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, h: Handoff<B>, s: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let (kind, x) = match h {
            Handoff::Forward { mb, x, eval } => (Kind::Forward { mb, eval }, x),
            Handoff::Backward { mb, grad } => (Kind::Backward { mb }, grad),
        };
        let bytes = compute(|| {
            s.be.wait(&x.ready);
            s.host.resize(B::buf_len(&x.buf), 0.0);
            s.be.download(B::whole(&x.buf), &mut s.host);
            let f = frame::encode_f32(kind, run_name(), STEP.load(Ordering::Relaxed), s.to.unit, x.b, x.t, &s.host);
            x.home.put_after(x.buf, s.be.record());
            f
        });
        dist::send_frame(s.to.stage, bytes);
        Ok(())
    }
}

/// Spawn a [`RemotePeerActor`] from `device` to `to`.
pub async fn remote_peer<B: Backend>(device: &str, settings: StreamSettings, to: Addr) -> Result<ActorRef<Handoff<B>>, RunError> {
    let args = RemotePeerArgs { device: device.to_string(), settings, to };
    let (actor, _) = Actor::spawn(None, RemotePeerActor::<B>::default(), args)
        .await
        .map_err(|e| super::error::from_spawn(&format!("the link from {device} to {} on stage {}", to.unit, to.stage), e))?;
    Ok(actor)
}

/// A layer hosted by another stage, as the scheduler sees it: it takes `LayerMsg`s and turns
/// each into a request to that stage. Spawning it spawns the layer there; stopping it stops the
/// layer.
pub struct RemoteLayerActor<B: Backend>(PhantomData<fn() -> B>);

impl<B: Backend> Default for RemoteLayerActor<B> {
    fn default() -> Self {
        RemoteLayerActor(PhantomData)
    }
}

pub struct RemoteLayerArgs {
    pub id: u64,
    pub stage: usize,
    /// The index of its device in the hosting stage's `[placement] devices`.
    pub device_index: usize,
    pub init: LayerInit,
    pub panic_at_step: Option<u64>,
    pub micro_batches: usize,
}

pub struct RemoteLayerState {
    id: u64,
    stage: usize,
}

impl<B: Backend> Actor for RemoteLayerActor<B> {
    type Msg = LayerMsg<B>;
    type State = RemoteLayerState;
    type Arguments = RemoteLayerArgs;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, a: RemoteLayerArgs) -> Result<Self::State, ActorProcessingErr> {
        let req = Request::Spawn {
            id: a.id,
            device_index: a.device_index,
            init: a.init,
            panic_at_step: a.panic_at_step,
            micro_batches: a.micro_batches,
        };
        match request(a.stage, req).await? {
            Reply::Done => Ok(RemoteLayerState { id: a.id, stage: a.stage }),
            _ => Err(unexpected("a spawn").into()),
        }
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: LayerMsg<B>, s: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let id = s.id;
        match msg {
            LayerMsg::Step { lr, step, reply } => match request(s.stage, Request::Step { id, lr, step }).await? {
                Reply::SumSq(ss) => {
                    let _ = reply.send(ss);
                }
                _ => return Err(unexpected("a step").into()),
            },
            LayerMsg::GetState(reply) => match request(s.stage, Request::GetState { id }).await? {
                Reply::State(st) => {
                    let _ = reply.send(st);
                }
                _ => return Err(unexpected("a state request").into()),
            },
            LayerMsg::SetState(state, reply) => {
                let r = request(s.stage, Request::SetState { id, state }).await.map(|_| ());
                let _ = reply.send(r);
            }
            LayerMsg::ResetOptState(reply) => {
                request(s.stage, Request::ResetOptState { id }).await?;
                let _ = reply.send(());
            }
            LayerMsg::InFlight(reply) => match request(s.stage, Request::InFlight { id }).await? {
                Reply::Count(n) => {
                    let _ = reply.send(n);
                }
                _ => return Err(unexpected("an in-flight count").into()),
            },
            LayerMsg::Link { .. } | LayerMsg::Handoff(_) => {
                return Err(RunError::Protocol(format!(
                    "layer {id} lives on stage {}: it is linked by address, and handed to through its stage",
                    s.stage
                ))
                .into())
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<Self::Msg>, s: &mut Self::State) -> Result<(), ActorProcessingErr> {
        // The layer goes with its stand-in (a move, or the end of the pipeline).
        let _ = request(s.stage, Request::Stop { id: s.id }).await;
        Ok(())
    }
}

/// On stage 0: shut the other stages of this replica down (the run is over).
pub async fn shutdown_stages() {
    for q in 1..dist::topology().stages {
        if let Err(e) = request(q, Request::Shutdown).await {
            eprintln!("warning: stage {q}: {e}");
        }
    }
}
