//! The sequential trainer: one thread of control, the units called in order.
//!
//! Each step: (growth, if the plan says so) → for each micro-batch: embed → blocks → head (loss
//! and its gradient) → blocks backward → embed backward → optimizer step on every unit → zero
//! gradients. Evaluation runs at step 0, every `eval.every` steps and at the end, on the same
//! fixed validation batches each time.

use super::log::RunLog;
use super::{dims_of, eval_due, RunOptions, TrainReport};
use crate::backend::Backend;
use crate::config::Config;
use crate::data::{sequential_batches, Dataset, Loader};
use crate::model::growth::{self, Expansion};
use crate::model::init::InitConfig;
use crate::model::{Batch, Model};
use crate::optim::schedule::Schedule;
use crate::optim::{step_units, Alone, Optimizer, Scratch};
use anyhow::{bail, Result};
use std::time::Instant;

/// Everything a sequential run holds.
pub struct Sequential<B: Backend> {
    pub be: B,
    pub cfg: Config,
    pub model: Model<B>,
    pub opt: Optimizer,
    pub schedule: Schedule,
    pub plan: Vec<Expansion>,
    pub init: InitConfig,
    scratch: Scratch<B>,
    loader: Loader,
    val: Vec<Vec<u32>>,
    batch: Batch<B>,
    windows: Vec<u32>,
    tmp_in: Vec<u32>,
    tmp_tgt: Vec<u32>,
    /// Updates done so far.
    pub step: u64,
    /// The step before whose update the model last grew (the learning-rate re-warmup's origin).
    grown_at: Option<u64>,
}

impl<B: Backend> Sequential<B> {
    pub fn new(be: B, cfg: &Config, data: &Dataset) -> Result<Self> {
        let dims = dims_of(cfg, data.vocab);
        crate::runtime::StreamSettings::of(cfg).apply(&be)?;
        let (b, t) = (cfg.data.batch_size, cfg.data.seq_len);
        let init = cfg.init_config();
        let model = Model::new(&be, dims, cfg.model.depth, &init);
        let loader = Loader::of(data, b, t, cfg.run.seed)?;
        let val: Vec<Vec<u32>> = sequential_batches(&data.val, b, t, cfg.eval.batches).collect::<Result<_>>()?;
        if val.is_empty() {
            bail!(
                "the validation split has {} tokens: too few for one batch of {b} x {} tokens (data.batch_size x data.seq_len+1)",
                data.val.len(),
                t + 1
            );
        }
        let batch = Batch::from_windows(&be, &val[0], b, t);
        Ok(Sequential {
            opt: Optimizer::new(cfg.optim.clone()),
            schedule: cfg.schedule.clone(),
            plan: cfg.expansions(),
            init,
            scratch: Scratch::default(),
            loader,
            val,
            batch,
            windows: Vec::new(),
            tmp_in: Vec::new(),
            tmp_tgt: Vec::new(),
            step: 0,
            grown_at: None,
            cfg: cfg.clone(),
            model,
            be,
        })
    }

    /// Mean loss over the fixed validation batches.
    pub fn evaluate(&mut self) -> f32 {
        let mut sum = 0.0f64;
        for w in &self.val {
            self.batch.load(&self.be, w, &mut self.tmp_in, &mut self.tmp_tgt);
            sum += self.model.eval_loss(&self.be, &self.batch) as f64;
        }
        (sum / self.val.len() as f64) as f32
    }

    /// Apply the expansions due before the update of the current step.
    pub fn grow_if_due(&mut self) -> Result<Vec<growth::GrowthRecord>> {
        let mut out = Vec::new();
        let due: Vec<Expansion> = self.plan.iter().filter(|e| e.at_step == self.step).cloned().collect();
        for e in due {
            out.push(growth::grow(&self.be, &mut self.model, &e, &self.init)?);
            self.grown_at = Some(self.step);
        }
        Ok(out)
    }

    /// One optimizer step over `micro_batches` micro-batches; returns (mean train loss, lr).
    pub fn train_step(&mut self) -> Result<(f32, f32)> {
        let (b, t) = (self.cfg.data.batch_size, self.cfg.data.seq_len);
        let mbs = self.cfg.data.micro_batches;
        let dscale = 1.0 / (b * t * mbs) as f32;
        let lr = self.schedule.lr_after_growth(self.step, self.grown_at);
        // The step's ops run where the backend issues them most cheaply (the CPU's compute pool).
        let loss = self.be.within(|| -> Result<f64> {
            let mut loss = 0.0f64;
            for _ in 0..mbs {
                self.loader.next_batch(&mut self.windows)?;
                self.batch.load(&self.be, &self.windows, &mut self.tmp_in, &mut self.tmp_tgt);
                loss += self.model.forward_backward(&self.be, &self.batch, dscale) as f64;
            }
            self.model.finish_grads(&self.be);
            let m = &mut self.model;
            let mut units: Vec<&mut crate::params::ParamSet<_>> = vec![&mut m.embed.w, &mut m.head.w];
            units.extend(m.blocks.iter_mut().map(|b| &mut b.w));
            step_units(&self.be, &self.opt, &mut self.scratch, &mut Alone, &mut units, lr, false);
            for blk in m.blocks.iter_mut() {
                blk.after_update(&self.be);
            }
            Ok(loss)
        })?;
        self.step += 1;
        Ok(((loss / mbs as f64) as f32, lr))
    }

    /// Run to the end (or `opts.stop_after`), logging as [`RunLog`] does.
    pub fn run(&mut self, opts: &RunOptions) -> Result<TrainReport> {
        if opts.resume {
            bail!("the sequential trainer does not resume from checkpoints: use the actor runtime (`taproot train --resume`)");
        }
        let total = self.cfg.run.steps;
        let end = opts.stop_after.map_or(total, |s| s.min(total));
        let tokens_per_step = (self.cfg.data.batch_size * self.cfg.data.seq_len * self.cfg.data.micro_batches) as f64;
        let mut log = RunLog::new(&self.cfg, &self.model.dims, opts, self.step).with_progress_bar(self.step, end);
        if self.step == 0 {
            let v = self.evaluate();
            log.eval(self.step, self.model.depth(), v);
        }
        while self.step < end {
            let t_grow = Instant::now();
            let grown = self.grow_if_due()?;
            let wall = t_grow.elapsed().as_secs_f64();
            for g in grown {
                log.growth(&g, wall, "");
            }
            let depth = self.model.depth();
            let t_step = Instant::now();
            let (loss, lr) = self.train_step()?;
            if !loss.is_finite() {
                bail!("training loss became {loss} at step {} (depth {depth}): stopping", self.step);
            }
            log.step(self.step, depth, lr, loss, tokens_per_step, t_step.elapsed().as_secs_f64());
            if eval_due(&self.cfg, self.step) {
                let v = self.evaluate();
                if log.eval(self.step, self.model.depth(), v) {
                    break;
                }
            }
        }
        let mut report = log.finish();
        (report.final_step, report.final_depth) = (self.step, self.model.depth());
        Ok(report)
    }
}
