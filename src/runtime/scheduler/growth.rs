//! Growth in the live pipeline: the runtime's side of the growth operator
//! (`model::growth`), applied by the scheduler at a step boundary with nothing in flight.
//!
//! An expansion from L_s to L_t blocks is a `model::growth::Plan`, carried out in its order: read
//! the trained state of every source block from its actor (`GetState`, for `copying`), spawn the
//! k = L_t − L_s newborn `LayerActor`s together (each makes its block with `Plan::make` on its
//! own thread; its random stream is keyed by its layer id, so the result does not depend on the
//! order they run in), reset optimizer state under the `reset` policy, splice them into the
//! stack; then the runtime's own part: move the layers whose device the placement policy changes,
//! relink the ring, check the replicas agree, and record it all in one `GrowthRecord`.

use super::{ask, boxed, gone, Layer, Res, SchedulerState};
use crate::backend::Backend;
use crate::model::growth::{Expansion, Plan};
use crate::params::UnitState;
use crate::runtime::embed_head::EmbedHeadMsg;
use crate::runtime::error::RunError;
use crate::runtime::events::Event;
use crate::runtime::frame::{Addr, Request, Unit};
use crate::runtime::handoff::Peer;
use crate::runtime::layer::{LayerInit, LayerMsg};
use crate::runtime::placement;
use crate::runtime::remote::{self, RemoteLayerActor, RemoteLayerArgs};
use ractor::Actor;
use std::collections::HashMap;
use std::time::Instant;

impl<B: Backend> SchedulerState<B> {
    /// Spawn the layer actor `id` on `device` (a slot: on another stage it is a
    /// `RemoteLayerActor` standing in for the layer there), linked to the supervisor.
    pub(super) async fn spawn_layer(&self, id: u64, device: String, init: LayerInit) -> Res<Layer<B>> {
        let armed = !self.opts.faults_disarmed && self.cfg.faults.panic_layer == Some(id);
        let panic_at_step = armed.then_some(self.cfg.faults.panic_at_step).flatten();
        let (stage, device_index) = placement::slot_of(&device, &self.cfg.placement.devices);
        if stage > 0 {
            let args = RemoteLayerArgs { id, stage, device_index, init, panic_at_step, micro_batches: self.local_micro_batches() };
            let (actor, _) = Actor::spawn_linked(None, RemoteLayerActor::<B>::default(), args, self.supervisor.clone())
                .await
                .map_err(|e| boxed(crate::runtime::error::from_spawn(&format!("spawning layer {id} on {device}"), e)))?;
            let rank = self.topo.rank_of(stage);
            self.here.name(&actor.get_cell(), format!("layer {id} ({device}, rank {rank})"));
            return Ok(Layer { id, device, actor });
        }
        let actor =
            self.here.spawn(id, &device, init, panic_at_step, self.local_micro_batches(), self.supervisor.clone()).await.map_err(boxed)?;
        Ok(Layer { id, device, actor })
    }

    /// The stage of stack position `i` (None: the embed-head actor, on stage 0).
    fn stage_of(&self, i: Option<usize>) -> usize {
        i.map_or(0, |i| placement::slot_of(&self.stack.layers[i].device, &self.cfg.placement.devices).0)
    }

    fn addr(&self, i: Option<usize>) -> Addr {
        let unit = i.map_or(Unit::Ends, |i| Unit::Layer(self.stack.layers[i].id));
        Addr { stage: self.stage_of(i), unit }
    }

    /// The peer a local unit on `from_device` hands to for stack position `to` (None: the
    /// embed-head actor): the actor itself when it is in this process, else a new link to it.
    async fn peer_for(&mut self, from_device: &str, to: Option<usize>) -> Res<Peer<B>> {
        if self.stage_of(to) == 0 {
            return Ok(match to {
                Some(i) => self.stack.layers[i].actor.get_derived(),
                None => self.embed_head.get_derived(),
            });
        }
        let to = self.addr(to);
        self.here.link(from_device, to, &mut self.links).await.map_err(boxed)
    }

    /// Tell every actor of the pipeline its neighbours. Called whenever the stack changes (nothing in flight).
    /// Layers on other stages are told by address, and the call returns once every stage has
    /// them linked, so no frame of the next step can reach an unlinked layer.
    pub(super) async fn relink(&mut self) -> Res<()> {
        for l in self.links.drain(..) {
            l.stop(None);
        }
        let n = self.stack.layers.len();
        if self.topo.stages > 1 {
            // The units frames may be addressed to in this process.
            self.here.clear_routes();
            self.here.route(Unit::Ends, self.embed_head.get_derived(), &self.ends_device);
            for i in (0..n).filter(|&i| self.stage_of(Some(i)) == 0) {
                let s = &self.stack.layers[i];
                self.here.route(Unit::Layer(s.id), s.actor.get_derived(), &s.device);
            }
        }
        let ends = self.ends_device.clone();
        let (first, last) =
            if n > 0 { (Some(self.peer_for(&ends, Some(0)).await?), Some(self.peer_for(&ends, Some(n - 1)).await?)) } else { (None, None) };
        self.embed_head.cast(EmbedHeadMsg::Link { first, last }).map_err(gone)?;
        for i in 0..n {
            let (below, above) = (i.checked_sub(1), (i + 1 < n).then_some(i + 1));
            let stage = self.stage_of(Some(i));
            if stage == 0 {
                let device = self.stack.layers[i].device.clone();
                let prev = self.peer_for(&device, below).await?;
                let next = self.peer_for(&device, above).await?;
                self.stack.layers[i].actor.cast(LayerMsg::Link { prev, next }).map_err(gone)?;
            } else {
                let req = Request::Link { id: self.stack.layers[i].id, prev: self.addr(below), next: self.addr(above) };
                remote::request(stage, req).await.map_err(boxed)?;
            }
        }
        Ok(())
    }

    /// With several replicas: check that the layers `ids` (and, with `ends`, the embedding and
    /// head) are identical in every replica, as they must be (each step applies the same summed
    /// gradients; a newborn's init is keyed by its layer id). `when` starts the error, which
    /// names the first unit that differs. Every replica must call this at the same point.
    pub(super) async fn check_replicas_agree(&self, ids: &[u64], ends: bool, when: &str) -> Res<()> {
        if self.topo.replicas == 1 {
            return Ok(());
        }
        let mut names = Vec::new();
        let mut sums = Vec::new();
        // max(h) and max(!h) = !min(h): equal everywhere iff max(h) == min(h).
        let mut add = |name: String, params: &[f32]| {
            let h = crate::checkpoint::checksum::hash_f32(params);
            names.push(name);
            sums.extend([h, !h]);
        };
        if ends {
            let (embed, head) = ask(&self.embed_head, "GetState", EmbedHeadMsg::GetState).await?;
            add("the embedding".into(), &embed.params);
            add("the head".into(), &head.params);
        }
        for s in self.stack.layers.iter().filter(|s| ids.contains(&s.id)) {
            let st = ask(&s.actor, "GetState", LayerMsg::GetState).await?;
            add(format!("layer {}", s.id), &st.params);
        }
        crate::dist::all_max_u64(&mut sums);
        if let Some((name, _)) = names.iter().zip(sums.chunks(2)).find(|(_, pair)| pair[0] != !pair[1]) {
            return Err(boxed(RunError::Protocol(format!("{when}, {name} is not the same in every data-parallel replica"))));
        }
        Ok(())
    }

    /// `GrowNow`: take the next expansion of the plan and apply it at this boundary.
    pub(super) async fn grow_next_planned(&mut self) -> Result<usize, RunError> {
        let Some(i) = self.stack.plan.iter().position(|e| e.to_depth > self.stack.layers.len()) else {
            return Err(RunError::Refused(format!("no expansion left in the growth plan (depth is {})", self.stack.layers.len())));
        };
        let mut e = self.stack.plan.remove(i);
        e.at_step = self.clock.step;
        self.grow(&e).await.map_err(|e| RunError::from_actor(&e))?;
        Ok(self.stack.layers.len())
    }

    /// Apply the expansions due before the update of the current step.
    pub(super) async fn grow_if_due(&mut self) -> Res<()> {
        let due: Vec<Expansion> = self.stack.plan.iter().filter(|e| e.at_step == self.clock.step).cloned().collect();
        for e in due {
            self.grow(&e).await?;
        }
        Ok(())
    }

    /// Carry out one expansion in the order `model::growth::Plan` documents.
    async fn grow(&mut self, e: &Expansion) -> Res<()> {
        let t0 = Instant::now();
        let ls = self.stack.layers.len();
        let mut init_cfg = self.init_cfg.clone();
        if self.cfg.faults.diverge_replica == Some(self.topo.replica) {
            init_cfg.seed ^= 1;
        }
        let mut plan =
            Plan::new(e, ls, self.stack.next_id, &self.dims, &init_cfg).map_err(|e| boxed(RunError::Config(format!("{e:#}"))))?;
        plan.at_step = self.clock.step;
        // 1. The trained state of every source block, read from its actor.
        let mut snaps: HashMap<usize, UnitState> = HashMap::new();
        for i in plan.sources() {
            snaps.insert(i, ask(&self.stack.layers[i].actor, "GetState", LayerMsg::GetState).await?);
        }
        let positions: Vec<usize> = plan.births.iter().map(|b| b.position).collect();
        let old_devices: Vec<String> = self.stack.layers.iter().map(|s| s.device.clone()).collect();
        let p = &self.cfg.placement;
        let devices = placement::after_growth(p.policy, &self.slots, &old_devices, &positions, self.cfg.target_depth());
        // 2. All newborns at once: each makes its block on its own thread.
        let spawns = plan.births.iter().enumerate().map(|(j, b)| {
            let init = LayerInit::Born { plan: Box::new(plan.clone()), j, source: b.source.map(|i| snaps[&i].clone()) };
            self.spawn_layer(b.id, devices[b.position].clone(), init)
        });
        let newborn = futures::future::try_join_all(spawns).await?;
        self.stack.next_id = plan.next_id();
        // 3. `reset`: the units that were there before.
        if plan.resets_state() {
            for s in &self.stack.layers {
                ask(&s.actor, "ResetOptState", LayerMsg::ResetOptState).await?;
            }
            ask(&self.embed_head, "ResetOptState", EmbedHeadMsg::ResetOptState).await?;
        }
        // 4. The splice, then the runtime's own part: placement, links, agreement, the record.
        plan.splice(&mut self.stack.layers, newborn);
        let moved = self.move_layers(&devices).await?;
        self.relink().await?;
        let new_ids: Vec<u64> = plan.births.iter().map(|b| b.id).collect();
        self.check_replicas_agree(&new_ids, false, &format!("after growth at step {}", self.clock.step)).await?;
        let record = plan.record(self.stack.layers.iter().map(|s| s.id).collect());
        let seconds = t0.elapsed().as_secs_f64();
        self.stack.growth.push(record.clone());
        self.log.growth(&record, seconds, &format!(" moved={moved} placement={}", devices.join(",")));
        (self.observer)(&Event::Growth { record, seconds });
        Ok(())
    }

    /// Move every layer whose device differs from `devices` (same stack order): snapshot,
    /// stop, respawn on the new device from the snapshot. Returns how many moved.
    async fn move_layers(&mut self, devices: &[String]) -> Res<usize> {
        let mut moved = 0;
        for (i, device) in devices.iter().enumerate().take(self.stack.layers.len()) {
            if &self.stack.layers[i].device == device {
                continue;
            }
            let st = ask(&self.stack.layers[i].actor, "GetState", LayerMsg::GetState).await?;
            let old = &self.stack.layers[i];
            old.actor.stop_and_wait(Some("moved to another device".into()), None).await.map_err(gone)?;
            let new = self.spawn_layer(old.id, device.clone(), LayerInit::Restore(st)).await?;
            self.stack.layers[i] = new;
            moved += 1;
        }
        Ok(moved)
    }
}
