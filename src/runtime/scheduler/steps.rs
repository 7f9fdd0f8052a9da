//! The scheduler's step loop: issuing micro-batches under the in-flight bound, ending a step
//! (the optimizer barrier) or an evaluation, checkpoints, and the end of the run.

/// How many times a checkpoint's save is tried before it counts as failed.
const SAVE_TRIES: u32 = 3;

use super::{ask, boxed, gone, Pending, Phase, Res, RunEnded, SchedulerMsg, SchedulerState, Status};
use crate::backend::Backend;
use crate::checkpoint::{self, Checkpoint, Meta, UnitKey};
use crate::flops;
use crate::runtime::compute;
use crate::runtime::embed_head::EmbedHeadMsg;
use crate::runtime::error::RunError;
use crate::runtime::events::Event;
use crate::runtime::handoff::MicroDone;
use crate::runtime::layer::LayerMsg;
use crate::train::eval_due;
use ractor::ActorRef;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl<B: Backend> SchedulerState<B> {
    fn max_in_flight(&self) -> usize {
        let cap = self.cfg.pipeline.max_in_flight;
        let auto = self.stack.layers.len() + 1;
        if cap == 0 { auto } else { cap }.max(1)
    }

    /// Come back to [`SchedulerState::next`] through the mailbox (so that other messages, such
    /// as a status request, are answered in between).
    pub(super) fn again(&self, me: &ActorRef<SchedulerMsg>) -> Res<()> {
        me.cast(SchedulerMsg::Next).map_err(|e| boxed(RunError::Protocol(e.to_string())))
    }

    /// Whether the optimizer state is sharded over the replicas (ZeRO-1).
    pub(super) fn sharded(&self) -> bool {
        self.cfg.parallel.zero == 1 && self.topo.replicas > 1
    }

    /// The micro-batches of a step this process trains: `data.micro_batches` split evenly over
    /// the data-parallel replicas (rank r takes the r-th consecutive share of the step's
    /// batches, so the global batch is the same whatever the number of replicas).
    pub(super) fn local_micro_batches(&self) -> usize {
        self.cfg.data.micro_batches / self.topo.replicas
    }

    /// Draw and drop `n` batches: the shares of the other replicas.
    fn skip_batches(&mut self, n: usize) -> Res<()> {
        let mut scratch = Vec::new();
        for _ in 0..n {
            self.loader.next_batch(&mut scratch).map_err(|e| boxed(RunError::Data(format!("{e:#}"))))?;
        }
        Ok(())
    }

    /// Issue micro-batches of `p` (a training step when `train`, else an evaluation) while
    /// fewer than the bound are in flight.
    fn issue(&mut self, p: &mut Pending, train: bool) -> Res<()> {
        let total = if train { self.local_micro_batches() } else { self.val.len() };
        let dscale = 1.0 / (self.cfg.data.batch_size * self.cfg.data.seq_len * self.cfg.data.micro_batches) as f32;
        while p.issued < total && p.issued - p.done < self.max_in_flight() {
            let mb = self.clock.next_mb;
            self.clock.next_mb += 1;
            p.index.insert(mb, p.issued);
            let msg = if train {
                let mut windows = Vec::new();
                self.loader.next_batch(&mut windows).map_err(|e| boxed(RunError::Data(format!("{e:#}"))))?;
                EmbedHeadMsg::Micro { mb, windows, dscale }
            } else {
                EmbedHeadMsg::EvalMicro { mb, windows: self.val[p.issued].clone() }
            };
            p.issued += 1;
            self.embed_head.cast(msg).map_err(gone)?;
        }
        if train {
            (self.observer)(&Event::InFlight(p.issued - p.done));
        }
        Ok(())
    }

    /// A micro-batch finished: record its loss; end the step (or the evaluation) when it was
    /// the last, else issue the next one.
    pub(super) async fn micro_done(&mut self, me: &ActorRef<SchedulerMsg>, d: MicroDone) -> Res<()> {
        let (mut p, train) = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Train(p) => (p, true),
            Phase::Eval(p) => (p, false),
            other => {
                self.phase = other;
                return Err(boxed(RunError::Protocol(format!("micro-batch {} finished outside a step or an evaluation", d.mb))));
            }
        };
        let i = *p.index.get(&d.mb).ok_or_else(|| boxed(RunError::Protocol(format!("unknown micro-batch {}", d.mb))))?;
        p.losses[i] = d.loss;
        p.done += 1;
        if self.agree.force_stop {
            // Issue nothing more; once the micro-batches in flight are back, stop.
            if p.done == p.issued {
                return self.stop_now(train).await;
            }
            self.phase = if train { Phase::Train(p) } else { Phase::Eval(p) };
            return Ok(());
        }
        let total = if train { self.local_micro_batches() } else { self.val.len() };
        match (p.done == total, train) {
            (true, true) => self.end_step(me, p.losses).await,
            (true, false) => self.end_eval(me, p.losses).await,
            (false, _) => {
                self.issue(&mut p, train)?;
                self.phase = if train { Phase::Train(p) } else { Phase::Eval(p) };
                Ok(())
            }
        }
    }

    /// At a step boundary: answer control requests, evaluate if due, otherwise grow if due and
    /// start the next step, or finish.
    pub(super) async fn next(&mut self, _me: &ActorRef<SchedulerMsg>) -> Res<()> {
        // At a boundary: nothing is waited for from the other stages (see `dist::watchdog`).
        crate::dist::watchdog::step_ended();
        if self.agree.force_stop {
            return self.stop_now(false).await;
        }
        if self.agree.stop_requested {
            return self.finish().await;
        }
        // Sharded, every replica writes together: rank 0's request is agreed with the next
        // step's reduction, like a growth.
        let checkpoint = if self.sharded() { std::mem::take(&mut self.agree.checkpoint_agreed) } else { !self.checkpoint_now.is_empty() };
        if checkpoint {
            let r = self.write_checkpoint().await.map_err(|e| RunError::from_actor(&e));
            for reply in self.checkpoint_now.drain(..) {
                let _ = reply.send(r.clone());
            }
        }
        let grow = if self.topo.replicas > 1 { std::mem::take(&mut self.agree.grow_agreed) } else { !self.grow_now.is_empty() };
        if grow {
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
            crate::dist::watchdog::step_began(self.clock.step);
            self.issue(&mut p, false)?;
            self.phase = Phase::Eval(p);
            return Ok(());
        }
        if self.clock.step >= self.clock.end {
            return self.finish().await;
        }
        self.grow_if_due().await?;
        self.clock.step_started = Instant::now();
        crate::dist::watchdog::step_began(self.clock.step);
        self.clock.step_cursor = self.loader.cursor();
        self.skip_batches(self.topo.replica * self.local_micro_batches())?;
        let mut p = Pending { losses: vec![f32::NAN; self.local_micro_batches()], ..Default::default() };
        self.issue(&mut p, true)?;
        self.phase = Phase::Train(p);
        Ok(())
    }

    /// All micro-batches of the step are done: the optimizer step of every unit's actor, records, logs.
    async fn end_step(&mut self, me: &ActorRef<SchedulerMsg>, losses: Vec<f32>) -> Res<()> {
        let lr = self.schedule.lr_after_growth(self.clock.step, self.stack.growth.last().map(|g| g.at_step));
        let step = self.clock.step;
        // The replicas after this one take the rest of the step's batches.
        self.skip_batches((self.topo.replicas - 1 - self.topo.replica) * self.local_micro_batches())?;
        let mbs = self.cfg.data.micro_batches;
        // With the loss, whether any replica was asked to stop (then all stop after this step),
        // to grow now (then all grow at the next boundary) or to gather a checkpoint.
        let loss_sum = losses.iter().map(|&l| l as f64).sum::<f64>();
        let heard = self.agree.say(loss_sum, self.sharded() && !self.checkpoint_now.is_empty()).exchange();
        self.agree.hear(&heard);
        let loss = (heard.loss_sum / mbs as f64) as f32;
        let depth = self.stack.layers.len();
        if !loss.is_finite() {
            // Before the update: the weights are still those of the last good step, so they are
            // worth a checkpoint (resuming replays this step from its first micro-batch).
            (self.observer)(&Event::NonFinite { step: self.clock.step + 1, what: format!("training loss {loss}") });
            let checkpoint = self.checkpoint_last_good().await;
            return Err(boxed(RunError::NonFiniteLoss { step: self.clock.step + 1, depth, loss, checkpoint }));
        }
        // The barrier: every layer actor and the embed-head actor step; wait for all of them. (With several replicas each
        // stage first waits for the sum of its gradients, which it started after its last
        // backward: `runtime::grad_sync`.)
        // ZeRO-1: each actor's step ends in collectives (the owners' new weights), which every
        // replica must make in the same order, so the stages step one after the other.
        let one_by_one = self.sharded();
        let mut waits: Vec<ractor::concurrency::OneshotReceiver<f64>> = Vec::with_capacity(self.stack.layers.len() + 1);
        let mut grad_sumsq = 0.0f64;
        let (tx, rx) = ractor::concurrency::oneshot();
        self.embed_head.cast(EmbedHeadMsg::Step { lr, step, reply: tx.into() }).map_err(gone)?;
        waits.push(rx);
        for s in &self.stack.layers {
            if one_by_one {
                for w in waits.drain(..) {
                    grad_sumsq += w.await.map_err(|_| gone(format!("optimizer step {step}")))?;
                }
            }
            let (tx, rx) = ractor::concurrency::oneshot();
            s.actor.cast(LayerMsg::Step { lr, step, reply: tx.into() }).map_err(gone)?;
            waits.push(rx);
        }
        for w in waits {
            grad_sumsq += w.await.map_err(|_| gone(format!("optimizer step {step}")))?;
        }
        let grad_norm = grad_sumsq.sqrt();
        let tokens = (self.cfg.data.batch_size * self.cfg.data.seq_len * mbs) as f64;
        self.clock.step += 1;
        self.step_pub.store(self.clock.step, Ordering::Relaxed);
        crate::runtime::remote::set_step(self.clock.step);
        let seconds = self.clock.step_started.elapsed().as_secs_f64();
        self.log.step(self.clock.step, depth, lr, loss, tokens, seconds);
        let f = self.log.flops;
        (self.observer)(&Event::Step {
            step: self.clock.step,
            total_steps: self.cfg.run.steps,
            depth,
            lr,
            train_loss: loss,
            tokens: tokens as u64,
            seconds,
            flops_llmc: f.llmc,
            flops_ne: f.ne,
            fixed_flops_ne: f.fixed_ne,
            grad_norm,
            params: (flops::total_params(&self.dims, depth), flops::non_embedding_params(&self.dims, depth)),
            sources: self.sources.iter().cloned().zip(self.loader.cursor().source_tokens).collect(),
        });
        for (device, pool) in self.here.pools().iter() {
            (self.observer)(&Event::Buffers { device: device.clone(), allocated: pool.allocated(), peer_bytes_in: pool.peer_bytes_in() });
        }
        if !grad_norm.is_finite() {
            (self.observer)(&Event::NonFinite { step: self.clock.step, what: format!("gradient norm {grad_norm}") });
        }
        if eval_due(&self.cfg, self.clock.step) {
            self.eval_pending = true;
        } else {
            self.checkpoint_if_due().await?;
        }
        self.phase = Phase::Idle;
        self.again(me)
    }

    async fn end_eval(&mut self, me: &ActorRef<SchedulerMsg>, losses: Vec<f32>) -> Res<()> {
        let val_loss = (losses.iter().map(|&l| l as f64).sum::<f64>() / losses.len() as f64) as f32;
        let depth = self.stack.layers.len();
        if self.log.eval(self.clock.step, depth, val_loss) {
            self.clock.end = self.clock.step;
        }
        (self.observer)(&Event::Eval { step: self.clock.step, depth, val_loss });
        if self.sources.len() > 1 {
            let seen = self.loader.cursor().source_tokens;
            let total = seen.iter().sum::<u64>().max(1) as f64;
            let parts: Vec<String> =
                self.sources.iter().zip(&seen).map(|(n, &k)| format!("{n}={k} ({:.1}%)", 100.0 * k as f64 / total)).collect();
            self.log.say(format!("tokens by source: {}", parts.join(", ")));
        }
        self.sample().await?;
        self.checkpoint_if_due().await?;
        self.phase = Phase::Idle;
        self.again(me)
    }

    /// Before a checkpoint every replica reaches at the same step (periodic, final): the
    /// replicas compare a checksum of every unit's weights (see `check_replicas_agree`).
    async fn check_all_replicas_agree(&self) -> Res<()> {
        let ids: Vec<u64> = self.stack.layers.iter().map(|s| s.id).collect();
        self.check_replicas_agree(&ids, true, &format!("at the checkpoint of step {}", self.clock.step)).await
    }

    async fn checkpoint_if_due(&mut self) -> Res<()> {
        let every = self.cfg.checkpoint.every;
        if every > 0 && self.clock.step > 0 && self.clock.step.is_multiple_of(every) && self.clock.step < self.clock.end {
            self.check_all_replicas_agree().await?;
            // A periodic checkpoint that fails even when tried again does not end the run: the
            // next one may succeed (the final one must). Said in the log and as an event.
            if let Err(e) = self.write_checkpoint().await {
                let why = RunError::from_actor(&e).to_string();
                eprintln!("warning: {why}; training goes on");
                self.log.say(format!("warning: {why}; training goes on (the newest checkpoint on disk stands)"));
            }
        }
        Ok(())
    }

    /// Gather every unit's state and write one checkpoint (temp file, fsync, rename). In a
    /// data-parallel run rank 0 writes the run's checkpoints (every replica holds the same
    /// state); the others write nothing and answer with the checkpoint folder.
    /// Every unit's state, read from its actor. Sharded (ZeRO-1), every replica must call this
    /// at the same point: each snapshot gathers the state from all of them.
    async fn gather_units(&self) -> Res<Vec<(UnitKey, crate::params::UnitState)>> {
        let (embed, head) = ask(&self.embed_head, "GetState", EmbedHeadMsg::GetState).await?;
        let mut units = vec![(UnitKey::Embed, embed), (UnitKey::Head, head)];
        for s in &self.stack.layers {
            units.push((UnitKey::Layer(s.id), ask(&s.actor, "GetState", LayerMsg::GetState).await?));
        }
        Ok(units)
    }

    /// `eval.sample_tokens`: a text sample drawn from the model as it is now, said in the log
    /// (rank 0) and reported as an event. Best effort: a failure is a warning.
    async fn sample(&mut self) -> Res<()> {
        let n = self.cfg.eval.sample_tokens;
        if n == 0 || (self.topo.replica != 0 && !self.sharded()) {
            return Ok(());
        }
        let units = self.gather_units().await?;
        if !self.topo.is_lead() {
            return Ok(());
        }
        let ck = Checkpoint { meta: self.meta(), units };
        let drawn = compute(|| -> anyhow::Result<String> {
            // Built once (a GPT-2 or learnt BPE tokenizer takes a while to load).
            if self.sample_tokenizer.is_none() {
                self.sample_tokenizer = Some(crate::sample::tokenizer_of(&self.cfg)?);
            }
            let tok = self.sample_tokenizer.as_ref().expect("set above");
            let model = crate::sample::HostModel::from_checkpoint(&ck)?;
            let opts = crate::sample::SampleOptions { tokens: n, temperature: 1.0, top_k: 40, top_p: 1.0, seed: self.cfg.run.seed };
            Ok(tok.decode(&crate::sample::generate(&model, &tok.encode(&self.cfg.eval.sample_prompt), &opts)?))
        });
        let depth = self.stack.layers.len();
        match drawn {
            Ok(text) => {
                self.log.say(format!("sample step={} depth={depth}: {text:?}", self.clock.step));
                (self.observer)(&Event::Sample { step: self.clock.step, depth, text });
            }
            Err(e) => self.log.say(format!("warning: no sample at step {}: {e:#}", self.clock.step)),
        }
        Ok(())
    }

    fn meta(&self) -> Meta {
        Meta {
            format_version: checkpoint::FORMAT_VERSION,
            run_name: self.cfg.run.name.clone(),
            config_toml: self.cfg.to_toml(),
            step: self.clock.step,
            depth: self.stack.layers.len(),
            stack: self.stack.layers.iter().map(|s| s.id).collect(),
            next_id: self.stack.next_id,
            loader: self.loader.cursor(),
            growth: self.stack.growth.clone(),
            created_unix_s: checkpoint::unix_now_s(),
            run_id: Some(self.ckpt.run_id.clone()),
            extra: serde_json::Value::Null,
        }
    }

    /// Gather every unit's state and write one checkpoint, tried [`SAVE_TRIES`] times.
    pub(super) async fn write_checkpoint(&mut self) -> Res<PathBuf> {
        if self.topo.replica != 0 && !self.sharded() {
            return Ok(self.cfg.checkpoint_dir());
        }
        let t0 = Instant::now();
        let units = self.gather_units().await?;
        // The disk write needs no other stage: not timed by the watchdog.
        crate::dist::watchdog::step_ended();
        if self.topo.replica != 0 {
            return Ok(self.cfg.checkpoint_dir());
        }
        let meta = self.meta();
        let dir = self.cfg.checkpoint_dir();
        let keep = self.cfg.checkpoint.keep;
        let ck = Checkpoint { meta, units };
        let run_id = self.ckpt.run_id.clone();
        let resumed_from = self.ckpt.resumed_from.clone();
        // A save that fails (descriptors or disk space run out for a moment) is tried again:
        // SAVE_TRIES in all, a second apart, from the state gathered once.
        let mut tries = 0;
        let (path, pruned) = loop {
            tries += 1;
            let verified = &mut self.ckpt.verified;
            let saved = compute(|| -> anyhow::Result<(PathBuf, checkpoint::Pruned)> {
                let p = checkpoint::save(&dir, &ck)?;
                // Verified by reading it back (checksum included) before anything older is deleted.
                let back = checkpoint::verify(&p)?;
                anyhow::ensure!(back.step == ck.meta.step, "{} reads back as step {}", p.display(), back.step);
                verified.record(&p, back);
                let protect: Vec<PathBuf> = std::iter::once(p.clone()).chain(resumed_from.clone()).collect();
                let pruned = checkpoint::prune(&dir, &checkpoint::Retention { keep, run_id: &run_id, protect: &protect }, verified)?;
                Ok((p, pruned))
            });
            match saved {
                Ok(x) => break x,
                Err(e) if tries < SAVE_TRIES => {
                    self.log
                        .say(format!("warning: the checkpoint of step {} failed (try {tries} of {SAVE_TRIES}): {e:#}", self.clock.step));
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => {
                    return Err(boxed(RunError::Checkpoint(format!(
                        "writing the checkpoint of step {} ({SAVE_TRIES} tries): {e:#}",
                        self.clock.step
                    ))))
                }
            }
        };
        for (p, why) in &pruned.moved_aside {
            eprintln!("warning: {why}; moved to {}", p.display());
            self.log.say(format!("warning: checkpoint that does not verify moved to {}: {why}", p.display()));
        }
        for p in pruned.foreign.iter().filter(|p| !self.ckpt.foreign_reported.contains(*p)).cloned().collect::<Vec<_>>() {
            self.log.say(format!("note: {} belongs to another run: kept, not counted", p.display()));
            self.ckpt.foreign_reported.insert(p);
        }
        self.ckpt.last_checkpoint = Some((self.clock.step, path.clone()));
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let seconds = t0.elapsed().as_secs_f64();
        (self.observer)(&Event::Checkpoint { step: self.clock.step, path: path.display().to_string(), seconds, bytes });
        self.log.say(format!("checkpoint step={} path={} wall_ms={:.1}", self.clock.step, path.display(), seconds * 1e3));
        Ok(path)
    }

    /// A forced stop, with nothing in flight: checkpoint the last completed step and end the
    /// run with [`RunError::ForcedStop`]. `mid_step`: a training step was in progress.
    async fn stop_now(&mut self, mid_step: bool) -> Res<()> {
        if matches!(self.phase, Phase::Finished) {
            return Ok(());
        }
        self.phase = Phase::Finished;
        let checkpoint = if mid_step { self.checkpoint_last_good().await } else { self.checkpoint_here().await };
        let err = RunError::ForcedStop { step: self.clock.step, checkpoint };
        self.log.say(err.to_string());
        let _ = self.log.finish();
        self.ended.send_message(RunEnded(Err(err))).map_err(|e| boxed(RunError::Protocol(e.to_string())))
    }

    /// A checkpoint at this step boundary, unless one is on disk already (best effort).
    async fn checkpoint_here(&mut self) -> Option<String> {
        if self.clock.step == 0 {
            return None;
        }
        if self.agree.force_stop && self.sharded() {
            // Gathering sharded state needs every replica, and a forced stop is this replica's
            // alone: the newest periodic checkpoint stands.
            self.log.say("forced stop with the optimizer state sharded (parallel.zero = 1): no checkpoint of this step");
            return self.ckpt.last_checkpoint.as_ref().map(|(_, p)| p.display().to_string());
        }
        if let Some((s, p)) = &self.ckpt.last_checkpoint {
            if *s == self.clock.step {
                return Some(p.display().to_string());
            }
        }
        match self.write_checkpoint().await {
            Ok(p) => Some(p.display().to_string()),
            Err(e) => {
                eprintln!("warning: the last good state could not be checkpointed: {e}");
                None
            }
        }
    }

    /// A checkpoint of the state after the last completed step, taken mid-step: the weights are
    /// still those of that step, and the loader goes back to the step's start, so that resuming
    /// replays the dropped step from its first micro-batch. Best effort, as [`Self::checkpoint_here`].
    pub(super) async fn checkpoint_last_good(&mut self) -> Option<String> {
        if self.ckpt.last_checkpoint.as_ref().is_none_or(|(s, _)| *s != self.clock.step) {
            self.loader.restore(&self.clock.step_cursor.clone());
        }
        self.checkpoint_here().await
    }

    /// The run is over (all steps, an early stop, or a stop request): write the final checkpoint
    /// (unless this step's is already on disk) and report to the supervisor.
    pub(super) async fn finish(&mut self) -> Res<()> {
        if !matches!(self.phase, Phase::Finished) {
            self.phase = Phase::Finished;
            let done = self.ckpt.last_checkpoint.as_ref().filter(|(s, _)| *s == self.clock.step).map(|(_, p)| p.clone());
            let path = match done {
                Some(p) => p,
                None => {
                    self.check_all_replicas_agree().await?;
                    self.write_checkpoint().await?
                }
            };
            self.log.say(format!("final checkpoint step={} path={}", self.clock.step, path.display()));
            let mut report = self.log.finish();
            report.final_checkpoint = Some(path);
            (report.final_step, report.final_depth) = (self.clock.step, self.stack.layers.len());
            self.ended.send_message(RunEnded(Ok(report))).map_err(|e| boxed(RunError::Protocol(e.to_string())))?;
        }
        Ok(())
    }

    pub(super) fn status(&self) -> Status {
        let in_flight = match &self.phase {
            Phase::Train(p) | Phase::Eval(p) => p.issued - p.done,
            _ => 0,
        };
        let elapsed_s = self.log.elapsed_s();
        let done_here = self.log.steps_done() as f64;
        let eta_s = (done_here > 0.0).then(|| elapsed_s / done_here * (self.clock.end.saturating_sub(self.clock.step)) as f64);
        Status {
            run: self.cfg.run.name.clone(),
            step: self.clock.step,
            total_steps: self.cfg.run.steps,
            depth: self.stack.layers.len(),
            stack: self.stack.layers.iter().map(|s| (s.id, s.device.clone())).collect(),
            in_flight,
            paused: self.paused,
            elapsed_s,
            eta_s,
            placement: self.slots.clone(),
        }
    }
}
