//! A hosting stage (q > 0) of a pipeline split over processes: it spawns, links, steps,
//! snapshots, restores and stops the layers its stage 0 places on it, answering each request
//! with one reply (`super::remote`, `super::frame`), until stage 0 shuts it down.

use super::error::RunError;
use super::events;
use super::frame::{Reply, Request, Unit};
use super::handoff::Handoff;
use super::layer::LayerMsg;
use super::remote::{listen, notify, reply, set_run, set_step, start_dispatch};
use super::stage::LocalLayers;
use super::StreamSettings;
use crate::backend::Backend;
use crate::config::Config;
use crate::dist;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A hosting stage's layer.
struct Hosted<B: Backend> {
    actor: ActorRef<LayerMsg<B>>,
    device: String,
    /// Its links to units in other processes (stopped when it is relinked or stopped).
    links: Vec<ActorRef<Handoff<B>>>,
}

/// Supervises a hosting stage's layers: one that fails stops the whole run, naming it.
struct Watch;

impl Actor for Watch {
    type Msg = ();
    type State = Arc<Mutex<HashMap<ractor::ActorId, String>>>;
    type Arguments = Arc<Mutex<HashMap<ractor::ActorId, String>>>;

    async fn pre_start(&self, _me: ActorRef<()>, roles: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        Ok(roles)
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<()>,
        evt: SupervisionEvent,
        roles: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, e) = evt {
            let who = roles.lock().expect("roles lock").get(&cell.get_id()).cloned().unwrap_or_else(|| "a layer".into());
            let t = dist::topology();
            eprintln!("error (rank {}, stage {}): {who} failed: {e}", t.rank(), t.stage);
            dist::abort(1);
        }
        Ok(())
    }
}

/// Run a hosting stage (q > 0) of the pipeline until stage 0 shuts it down: spawn, link, step,
/// snapshot, restore and stop the layers stage 0 places here. `vocab` sizes the model.
pub fn serve<B: Backend>(cfg: &Config, vocab: usize, topo: dist::Topology) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve_async::<B>(cfg, vocab, topo, events::none()))
}

/// [`serve`] inside a multi-thread tokio runtime; the layers' events go to `observer`.
pub async fn serve_async<B: Backend>(cfg: &Config, vocab: usize, topo: dist::Topology, observer: events::Observer) -> anyhow::Result<()> {
    set_run(&cfg.run.name);
    let settings = StreamSettings::of(cfg);
    let mut requests = listen();
    start_dispatch::<B>(settings)?;
    let roles: Arc<Mutex<HashMap<ractor::ActorId, String>>> = Default::default();
    let (watch, _) = Actor::spawn(None, Watch, roles.clone()).await.map_err(|e| anyhow::anyhow!("starting the stage's supervisor: {e}"))?;
    // A stop signal here is passed to stage 0, which decides the step to stop at for everyone.
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        let early = crate::signals::received().min(2);
        tokio::spawn(async move {
            let mut seen = 0;
            for _ in 0..early {
                seen += 1;
                notify(0, Request::StopRun { force: seen > 1 });
            }
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                seen += 1;
                notify(0, Request::StopRun { force: seen > 1 });
            }
        })
    };
    let me = topo.stage;
    let here = LocalLayers::<B>::new(cfg, topo, crate::train::dims_of(cfg, vocab), observer.clone(), roles.clone());
    let mut layers: HashMap<u64, Hosted<B>> = HashMap::new();
    while let Some((from, rid, req)) = requests.recv().await {
        if let Request::Step { step, .. } = &req {
            set_step(*step);
        }
        let layer = |id: u64, layers: &HashMap<u64, Hosted<B>>| -> Result<ActorRef<LayerMsg<B>>, String> {
            layers.get(&id).map(|h| h.actor.clone()).ok_or_else(|| format!("layer {id} is not on stage {me}"))
        };
        // Requests with an answer from the layer: put the message in its mailbox now (so it
        // keeps its order with the next request), answer when the layer has.
        macro_rules! ask_layer {
            ($id:expr, $msg:expr, $wrap:expr) => {
                match layer($id, &layers) {
                    Ok(a) => {
                        let (tx, rx) = ractor::concurrency::oneshot();
                        let _ = a.cast($msg(tx.into()));
                        tokio::spawn(async move {
                            let r = match rx.await {
                                Ok(v) => $wrap(v),
                                Err(_) => Reply::Failed("the layer stopped".into()),
                            };
                            reply(from, rid, r);
                        });
                    }
                    Err(e) => reply(from, rid, Reply::Failed(e)),
                }
            };
        }
        match req {
            Request::Spawn { id, device_index, init, panic_at_step, micro_batches } => {
                let r: Result<(), String> = async {
                    let device = cfg.placement.devices.get(device_index).cloned().ok_or_else(|| {
                        format!("layer {id} is placed on device {device_index} of this stage, which has {}", cfg.placement.devices.len())
                    })?;
                    let actor =
                        here.spawn(id, &device, init, panic_at_step, micro_batches, watch.get_cell()).await.map_err(|e| e.to_string())?;
                    here.route(Unit::Layer(id), actor.get_derived(), &device);
                    layers.insert(id, Hosted { actor, device, links: Vec::new() });
                    Ok(())
                }
                .await;
                reply(from, rid, r.map_or_else(Reply::Failed, |_| Reply::Done));
            }
            Request::Link { id, prev, next } => {
                let r: Result<(), String> = async {
                    let h = layers.get_mut(&id).ok_or_else(|| format!("layer {id} is not on stage {me}"))?;
                    for l in h.links.drain(..) {
                        l.stop(None);
                    }
                    let mut peers = Vec::new();
                    for a in [prev, next] {
                        peers.push(here.link(&h.device, a, &mut h.links).await.map_err(|e| e.to_string())?);
                    }
                    let next = peers.pop().expect("two peers");
                    let prev = peers.pop().expect("two peers");
                    h.actor.cast(LayerMsg::Link { prev, next }).map_err(|e| e.to_string())
                }
                .await;
                reply(from, rid, r.map_or_else(Reply::Failed, |_| Reply::Done));
            }
            Request::Step { id, lr, step } => ask_layer!(id, |reply| LayerMsg::Step { lr, step, reply }, Reply::SumSq),
            Request::GetState { id } => ask_layer!(id, LayerMsg::GetState, Reply::State),
            Request::SetState { id, state } => {
                ask_layer!(id, |r| LayerMsg::SetState(state, r), |v: Result<(), RunError>| v
                    .map_or_else(|e| Reply::Failed(e.to_string()), |_| Reply::Done))
            }
            Request::ResetOptState { id } => ask_layer!(id, LayerMsg::ResetOptState, |_| Reply::Done),
            Request::InFlight { id } => ask_layer!(id, LayerMsg::InFlight, Reply::Count),
            Request::Stop { id } => {
                if let Some(h) = layers.remove(&id) {
                    here.unroute(Unit::Layer(id));
                    for l in h.links {
                        l.stop(None);
                    }
                    let _ = h.actor.stop_and_wait(Some("stopped by stage 0".into()), Some(std::time::Duration::from_secs(30))).await;
                }
                reply(from, rid, Reply::Done);
            }
            Request::StopRun { .. } => {}
            Request::Shutdown => {
                for (id, h) in layers.drain() {
                    here.unroute(Unit::Layer(id));
                    for l in h.links {
                        l.stop(None);
                    }
                    let _ = h.actor.stop_and_wait(Some("shutdown".into()), Some(std::time::Duration::from_secs(30))).await;
                }
                reply(from, rid, Reply::Done);
                break;
            }
        }
    }
    signals.abort();
    watch.stop(None);
    Ok(())
}
