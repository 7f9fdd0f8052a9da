//! The sequential trainer: one thread of control, the units called in order.
//!
//! Each step: (growth, if the plan says so) → for each micro-batch: embed → blocks → head (loss
//! and its gradient) → blocks backward → embed backward → optimizer step on every unit → zero
//! gradients. Evaluation runs at step 0, every `eval.every` steps and at the end, on the same
//! fixed validation batches each time.

use super::{dims_of, eval_due, EvalRecord, StepRecord, TrainReport};
use crate::backend::Backend;
use crate::config::Config;
use crate::data::{sequential_batches, Dataset, Loader};
use crate::flops;
use crate::model::growth::{self, Expansion};
use crate::model::init::InitConfig;
use crate::model::{Batch, Model};
use crate::optim::schedule::Schedule;
use crate::optim::{Optimizer, Scratch};
use anyhow::{bail, Result};
use std::time::Instant;

/// Knobs of a run that are not part of the experiment (logging, early stop for tests).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Print nothing.
    pub quiet: bool,
    /// Stop after this many steps (the schedule still spans `run.steps`).
    pub stop_after: Option<u64>,
    /// Stop at the first evaluation whose validation loss is below this.
    pub stop_below_val: Option<f32>,
}

/// Everything a sequential run holds.
pub struct Sequential<B: Backend> {
    pub be: B,
    pub cfg: Config,
    pub model: Model<B>,
    pub opt: Optimizer,
    pub sched: Schedule,
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
}

impl<B: Backend> Sequential<B> {
    pub fn new(be: B, cfg: &Config, data: &Dataset) -> Result<Self> {
        let dims = dims_of(cfg, data.vocab);
        let (b, t) = (cfg.data.batch_size, cfg.data.seq_len);
        let init = InitConfig::new(cfg.model.init, cfg.target_depth(), cfg.run.seed);
        let model = Model::new(&be, dims, cfg.model.depth, &init);
        let loader = Loader::new(data.train.clone(), b, t, cfg.run.seed)?;
        let val: Vec<Vec<u32>> = sequential_batches(&data.val, b, t, cfg.eval.batches).collect();
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
            sched: cfg.schedule.clone(),
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
    pub fn grow_if_due(&mut self) -> Result<Vec<growth::GrowthReport>> {
        let mut out = Vec::new();
        let due: Vec<Expansion> = self.plan.iter().filter(|e| e.at_step == self.step).cloned().collect();
        for e in due {
            out.push(growth::grow(&self.be, &mut self.model, &e, &self.init)?);
        }
        Ok(out)
    }

    /// One optimizer step over `micro_batches` micro-batches; returns (mean train loss, lr).
    pub fn train_step(&mut self) -> (f32, f32) {
        let (b, t) = (self.cfg.data.batch_size, self.cfg.data.seq_len);
        let mbs = self.cfg.data.micro_batches;
        let dscale = 1.0 / (b * t * mbs) as f32;
        let mut loss = 0.0f64;
        for _ in 0..mbs {
            self.loader.next_batch(&mut self.windows);
            self.batch.load(&self.be, &self.windows, &mut self.tmp_in, &mut self.tmp_tgt);
            loss += self.model.forward_backward(&self.be, &self.batch, dscale) as f64;
        }
        self.model.finish_grads(&self.be);
        let lr = self.sched.lr_at(self.step);
        let m = &mut self.model;
        self.opt.step(&self.be, &mut m.embed.w, &mut self.scratch, lr);
        for blk in m.blocks.iter_mut() {
            self.opt.step(&self.be, &mut blk.w, &mut self.scratch, lr);
        }
        self.opt.step(&self.be, &mut m.head.w, &mut self.scratch, lr);
        m.zero_grad(&self.be);
        self.step += 1;
        ((loss / mbs as f64) as f32, lr)
    }

    /// Run to the end (or `opts.stop_after`), logging as the module docs show.
    pub fn run(&mut self, opts: &RunOptions) -> Result<TrainReport> {
        let mut rep = TrainReport::default();
        let start = Instant::now();
        let total = self.cfg.run.steps;
        let end = opts.stop_after.map_or(total, |s| s.min(total));
        let tokens_per_step = (self.cfg.data.batch_size * self.cfg.data.seq_len * self.cfg.data.micro_batches) as f64;
        let (mut fl, mut fne) = (0.0f64, 0.0f64);
        let mut last_log = (Instant::now(), self.step);
        let say = |s: String| {
            if !opts.quiet {
                println!("{s}");
            }
        };
        let evaluate = |me: &mut Self, rep: &mut TrainReport, fl: f64, fne: f64| {
            let val_loss = me.evaluate();
            let e = EvalRecord {
                step: me.step,
                depth: me.model.depth(),
                val_loss,
                flops_llmc: fl,
                flops_ne: fne,
                elapsed_s: start.elapsed().as_secs_f64(),
            };
            if !opts.quiet {
                println!(
                    "step={}/{} depth={} val_loss={:.4} flops_llmc={:.3e} flops_ne={:.3e} elapsed_s={:.1}",
                    e.step, total, e.depth, e.val_loss, fl, fne, e.elapsed_s
                );
            }
            rep.evals.push(e);
        };
        if self.step == 0 {
            evaluate(self, &mut rep, fl, fne);
        }
        while self.step < end {
            let t_grow = Instant::now();
            let grown = self.grow_if_due()?;
            if !grown.is_empty() {
                rep.growth_wall_s.push(t_grow.elapsed().as_secs_f64());
            }
            for g in grown {
                say(format!("grow step={} depth={}->{} new_ids={:?} stack={:?}", self.step, g.from_depth, g.to_depth, g.new_ids, g.stack));
                rep.growth.push(g);
            }
            let depth = self.model.depth();
            let (loss, lr) = self.train_step();
            if !loss.is_finite() {
                bail!("training loss became {loss} at step {} (depth {depth}): stopping", self.step);
            }
            fl += flops::flops_per_token_llmc(&self.model.dims, depth, self.cfg.data.seq_len) * tokens_per_step;
            fne += flops::flops_per_token_non_embedding(&self.model.dims, depth) * tokens_per_step;
            rep.steps.push(StepRecord {
                step: self.step,
                depth,
                lr,
                train_loss: loss,
                flops_llmc: fl,
                flops_ne: fne,
                elapsed_s: start.elapsed().as_secs_f64(),
            });
            let le = self.cfg.run.log_every;
            if le > 0 && self.step % le == 0 {
                let dt = last_log.0.elapsed().as_secs_f64();
                let toks = (self.step - last_log.1) as f64 * tokens_per_step / dt.max(1e-9);
                say(format!(
                    "step={}/{} depth={} train_loss={:.4} lr={:.6} tok/s={:.0} elapsed_s={:.1}",
                    self.step,
                    total,
                    depth,
                    loss,
                    lr,
                    toks,
                    start.elapsed().as_secs_f64()
                ));
                last_log = (Instant::now(), self.step);
            }
            if eval_due(&self.cfg, self.step) {
                evaluate(self, &mut rep, fl, fne);
                let last = rep.evals.last().map(|e| e.val_loss);
                if let (Some(target), Some(v)) = (opts.stop_below_val, last) {
                    if v < target {
                        say(format!("stop step={} val_loss={v:.4} below {target}", self.step));
                        break;
                    }
                }
            }
        }
        rep.wall_s = start.elapsed().as_secs_f64();
        Ok(rep)
    }
}
