//! The layers of this process, the same for stage 0 (the scheduler's process) and a hosting stage
//! (`host`): spawning a layer actor with the run's arguments, registering it (its role, so that
//! a supervisor can name it when it fails; its route, so that frames from other stages reach it),
//! and linking a layer to a neighbour, on this stage or another.
//!
//! A *stage* is a process of the pipeline (`dist::Topology::stage`); the layers it hosts share
//! one activation pool per device ([`LocalLayers::pool`]).

use super::error::{from_spawn, RunError};
use super::events::Observer;
use super::frame::{Addr, Unit};
use super::handoff::{Handoff, Peer};
use super::layer::{LayerActor, LayerArgs, LayerInit, LayerMsg};
use super::remote::{remote_peer, routes, Route};
use super::{Roles, StreamSettings};
use crate::backend::pool::ActPool;
use crate::backend::Backend;
use crate::config::Config;
use crate::model::Dims;
use crate::optim::OptimConfig;
use ractor::{Actor, ActorCell, ActorRef};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// Everything a layer actor of this process is made with, and the pools and roles they share.
pub struct LocalLayers<B: Backend> {
    /// This process's place in the run: its stage is the one these layers are on.
    pub topo: crate::dist::Topology,
    dims: Dims,
    optim: OptimConfig,
    settings: StreamSettings,
    observer: Observer,
    zero: bool,
    pools: Mutex<BTreeMap<String, ActPool<B>>>,
    roles: Roles,
}

impl<B: Backend> LocalLayers<B> {
    pub fn new(cfg: &Config, topo: crate::dist::Topology, dims: Dims, observer: Observer, roles: Roles) -> Self {
        LocalLayers {
            topo,
            dims,
            optim: cfg.optim.clone(),
            settings: StreamSettings::of(cfg),
            observer,
            zero: cfg.parallel.zero == 1,
            pools: Mutex::new(BTreeMap::new()),
            roles,
        }
    }

    /// The activation pool of `device`, made on first use.
    pub fn pool(&self, device: &str) -> ActPool<B> {
        self.pools().entry(device.to_string()).or_default().clone()
    }

    /// Every device's pool.
    pub fn pools(&self) -> MutexGuard<'_, BTreeMap<String, ActPool<B>>> {
        self.pools.lock().expect("pools lock")
    }

    /// Name `cell` for the supervisor (`role`, e.g. "layer 3 (cpu:1)").
    pub fn name(&self, cell: &ActorCell, role: String) {
        self.roles.lock().expect("roles lock").insert(cell.get_id(), role);
    }

    /// Spawn layer `id` on `device`, linked to `supervisor` and named for it.
    pub async fn spawn(
        &self,
        id: u64,
        device: &str,
        init: LayerInit,
        panic_at_step: Option<u64>,
        micro_batches: usize,
        supervisor: ActorCell,
    ) -> Result<ActorRef<LayerMsg<B>>, RunError> {
        let args = LayerArgs {
            id,
            device: device.to_string(),
            dims: self.dims.clone(),
            init,
            optim: self.optim.clone(),
            stream: self.settings,
            panic_at_step,
            observer: self.observer.clone(),
            pool: self.pool(device),
            micro_batches,
            zero: self.zero,
            topology: self.topo,
        };
        let (actor, _) = Actor::spawn_linked(None, LayerActor::<B>::default(), args, supervisor)
            .await
            .map_err(|e| from_spawn(&format!("spawning layer {id} on {device}"), e))?;
        self.name(&actor.get_cell(), format!("layer {id} ({device})"));
        Ok(actor)
    }

    /// Frames addressed to `unit` in this process go to `peer`, uploaded to `device`.
    pub fn route(&self, unit: Unit, peer: Peer<B>, device: &str) {
        routes::<B>().set(unit, Route { peer, device: device.into(), pool: self.pool(device) });
    }

    /// Frames are no longer addressed to `unit` here.
    pub fn unroute(&self, unit: Unit) {
        routes::<B>().remove(unit);
    }

    /// Forget every route (the stack is about to be linked anew).
    pub fn clear_routes(&self) {
        routes::<B>().clear();
    }

    /// The neighbour at `to` of a unit on `from_device`: its routed actor when it is on this
    /// stage, else a new link to its stage (kept in `links`, to stop at the next relink).
    pub async fn link(&self, from_device: &str, to: Addr, links: &mut Vec<ActorRef<Handoff<B>>>) -> Result<Peer<B>, RunError> {
        if to.stage == self.topo.stage {
            let here = self.topo.stage;
            return routes::<B>().peer(to.unit).ok_or_else(|| RunError::Protocol(format!("{} is not on stage {here}", to.unit)));
        }
        let l = remote_peer::<B>(from_device, self.settings, to).await?;
        let p = l.get_derived();
        links.push(l);
        Ok(p)
    }
}
